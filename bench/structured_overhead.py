"""What JSON-schema-constrained decoding costs: decode throughput at 16 rows with and without it.

    python bench/structured_overhead.py [--rows 16] [--steps 16] [--repeats 5] [--exit full] [--out docs/structured_outputs.md]

Through LLMEngine directly (no HTTP). Each repeat runs the same prompts three ways, interleaved so
a change in the machine's load hits all three alike: free (no constraint), every row under a JSON
schema with the masks prefetched while the model runs (the engine's path), and the same with the
prefetch disabled (masks filled on the step loop just before sampling). Only decode steps with
every row decoding are timed; the schema (an object holding at least 40 strings) cannot complete
within them, so no row leaves early. Prints medians over repeats of tokens/s (wall time), of
process CPU milliseconds per step (every thread, llguidance's included), and of the step loop's
wall milliseconds per step inside the grammar code (queueing the fill, waiting for and applying the
masks, advancing the matchers): on a busy machine the model's own time swings by 2x between runs,
and this last column is the cost itself, measured directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from balcony_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from balcony_runtime.loader import load_model  # noqa: E402
from balcony_runtime.sampling_params import SamplingParams  # noqa: E402
from balcony_runtime.structured import token_masks  # noqa: E402
from balcony_runtime.structured.constraint import StructuredOutput  # noqa: E402
from balcony_runtime.structured.request_grammar import RequestGrammar  # noqa: E402
from decode_throughput import write_section  # noqa: E402  (bench/, beside this script)

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 40},
        "count": {"type": "integer"},
    },
    "required": ["title", "facts", "count"],
    "additionalProperties": False,
}
TOPICS = ["Paris", "the Moon", "Python", "bees", "tea", "the Nile", "chess", "volcanoes",
          "Mozart", "rain", "glass", "owls", "the Alps", "bread", "comets", "silk"]


def prompts(tokenizer, rows: int) -> list[list[int]]:
    out = []
    for i in range(rows):
        ask = f"Write facts about {TOPICS[i % len(TOPICS)]} as a JSON object with a title and a list of facts."
        text = tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


class GrammarClock:
    """Wall seconds the step loop spends in the grammar code, by wrapping its three entry points."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    @contextlib.contextmanager
    def installed(self, engine: LLMEngine):
        saved = engine.masks.prefetch, token_masks.mask_logits, RequestGrammar.accept
        engine.masks.prefetch = self.wrap(saved[0])
        token_masks.mask_logits = self.wrap(saved[1])  # the runner imports it at each call
        RequestGrammar.accept = self.wrap(saved[2])
        try:
            yield self
        finally:
            engine.masks.prefetch, token_masks.mask_logits, RequestGrammar.accept = saved


def measure(engine: LLMEngine, ids: list[list[int]], params: SamplingParams, exit_layer,
            steps: int) -> tuple[float, float, float]:
    """(tokens/s, CPU ms per step, grammar ms per step) over ``steps`` decode steps with every row decoding."""
    rids = [engine.add_request(p, params, exit_layer) for p in ids]
    while any(engine.request_needs_prefill(r) for r in rids):
        engine.step()
    wall = cpu = 0.0
    clock = GrammarClock()
    with clock.installed(engine):
        for _ in range(steps):
            w0, c0 = time.perf_counter(), time.process_time()
            outs = engine.step()
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            if len(outs) != len(ids) or any(o.finished for o in outs):
                raise RuntimeError("a row left the batch early: raise max_tokens or the schema's minItems")
    for r in rids:
        engine.abort(r)
    return len(ids) * steps / wall, 1000 * cpu / steps, 1000 * clock.seconds / steps


def run(rows: int, steps: int, repeats: int, exit_name: str, dtype: str) -> str:
    loaded = load_model(adapters="default", dtype=dtype, device="cpu")
    engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=4096, max_num_seqs=rows))
    exit_layer = engine.parse_exit(exit_name if exit_name == "full" else int(exit_name))
    ids = prompts(loaded.tokenizer, rows)
    free = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    schema = SamplingParams(max_tokens=steps + 8, temperature=0, structured=StructuredOutput.of_schema(SCHEMA))
    prefetch = engine.masks.prefetch
    modes = {"free": (free, prefetch), "json_schema": (schema, prefetch),
             "json_schema, no prefetch": (schema, lambda grammars: None)}
    measure(engine, ids, free, exit_layer, 4)  # warm-up (and llguidance's tokenizer is built next)
    measure(engine, ids, schema, exit_layer, 4)
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for mode, (params, fill) in modes.items():
            engine.masks.prefetch = fill
            results[mode].append(measure(engine, ids, params, exit_layer, steps))
    engine.masks.prefetch = prefetch
    load_after = os.getloadavg()[0]

    base_rate = statistics.median(r for r, _, _ in results["free"])
    base_cpu = statistics.median(c for _, c, _ in results["free"])
    lines = [
        f"{rows} rows at exit {exit_name}, {dtype}, {steps} decode steps per run, median of {repeats} runs; "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before and {load_after:.1f} after.",
        "",
        "| mode | tokens/s | vs free | CPU ms/step | vs free | grammar ms/step | wall ms/step | tokens/s of each run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        grammar = statistics.median(g for _, _, g in runs)
        each = ", ".join(f"{r:.1f}" for r, _, _ in runs)
        lines.append(f"| {mode} | {rate:.1f} | {rate / base_rate:.3f} | {cpu:.1f} | {cpu / base_cpu:.3f} | "
                     f"{grammar:.1f} | {1000 * rows / rate:.0f} | {each} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exit", default="full", help="an exit's layer count, or full")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("docs/structured_outputs.md"))
    args = parser.parse_args()
    table = run(args.rows, args.steps, args.repeats, args.exit, args.dtype)
    print(table)
    write_section(args.out, "structured-overhead", table, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
