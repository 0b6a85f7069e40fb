"""Decode throughput of our engine against transformers' generate, per exit and dtype.

    python bench/decode_throughput.py [--dtypes float32 bfloat16] [--tokens 48] [--out docs/benchmarks.md]

Prints a markdown table and writes it (with the command and machine) into the output file between
markers, so docs/benchmarks.md keeps other sections. Decode rate = tokens generated after the first
(prefill) step divided by the time of those steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import load_model
from balcony_runtime.sampling_params import SamplingParams

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(items):",
    "In a distant galaxy, a small robot",
    "The three laws of thermodynamics state that",
    "Once upon a time there was a",
    "import numpy as np\nimport torch\n",
    "The recipe calls for two cups of flour,",
    "Photosynthesis is the process by which",
]


def engine_decode_rate(engine: LLMEngine, batch: int, exit_layer, tokens: int) -> tuple[float, float]:
    """(tokens/s over decode steps, mean decode step seconds) for ``batch`` concurrent requests."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(PROMPTS[i % len(PROMPTS)] + f" ({i})", params, exit_layer=exit_layer)
    engine.step()  # prefill of every prompt (they fit one step's token budget)
    generated, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - start
    return generated / elapsed, elapsed / steps


def hf_decode_rate(hf, tokenizer, tokens: int) -> float:
    """transformers generate, batch 1, greedy: decode tokens/s (prefill time subtracted)."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids

    def timed(n: int) -> float:
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(4)  # warm-up
    return (tokens - 1) / (timed(tokens) - timed(1))


def ideal_share(model, exit_layer: int) -> float:
    """Weights an exit's decode step reads, over the full model's: layers plus the LM head."""
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    head = model.lm_head.numel()
    layers = exit_layer + 1 if exit_layer < model.full_depth else model.full_depth
    return (layers * per_layer + head) / (model.full_depth * per_layer + head)


def run(dtypes: list[str], tokens: int, batch: int) -> str:
    from transformers import LlamaForCausalLM

    lines = [
        f"Decode, default model, {tokens} tokens per request, greedy; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| dtype | exit | ours batch 1 tok/s | vs HF batch 1 | ours batch "
        f"{batch} tok/s | vs HF batch 1 | step ms (batch {batch}) | share of full step | ideal share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in dtypes:
        loaded = load_model(adapters=None, dtype=dtype, device="cpu")
        hf = LlamaForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval()
        hf_rate = hf_decode_rate(hf, loaded.tokenizer, tokens)
        del hf
        engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=4096, max_num_seqs=batch))
        engine_decode_rate(engine, 2, "full", 4)  # warm-up
        rows = {}
        for exit_layer in (*loaded.model.exits, loaded.model.full_depth):
            one, _ = engine_decode_rate(engine, 1, exit_layer, tokens)
            many, step = engine_decode_rate(engine, batch, exit_layer, tokens)
            rows[exit_layer] = (one, many, step)
        full_step = rows[loaded.model.full_depth][2]
        for exit_layer, (one, many, step) in rows.items():
            name = "full" if exit_layer == loaded.model.full_depth else str(exit_layer)
            lines.append(
                f"| {dtype} | {name} | {one:.1f} | {one / hf_rate:.2f}x | {many:.1f} | {many / hf_rate:.2f}x | "
                f"{step * 1e3:.1f} | {step / full_step:.2f} | {ideal_share(loaded.model, exit_layer):.2f} |"
            )
        lines.append(f"| {dtype} | HF generate | {hf_rate:.1f} | 1.00x | | | | | |")
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str, command: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n`{command}`\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    table = run(args.dtypes, args.tokens, args.batch)
    print(table)
    command = "python bench/decode_throughput.py " + " ".join(
        [f"--dtypes {' '.join(args.dtypes)}", f"--tokens {args.tokens}", f"--batch {args.batch}"]
    )
    write_section(args.out, "decode-throughput", table, command)


if __name__ == "__main__":
    main()
