"""What the prefix cache saves: prompts that share a system prompt, and the n choices of one prompt.

    python bench/prefix_caching.py [--dtype auto] [--system-tokens 512] [--questions 8] [--n 4]
                                   [--threads 2] [--out docs/benchmarks.md]

Two workloads, each run on an engine with the cache and on one without (``prefix_caching=False``),
in process (no HTTP), the default model with its adapters, full depth, greedy:

- shared system prompt: ``--questions`` requests, one after another, each a ``--system-tokens``
  system prompt plus a distinct short question; the figure is the median time to first token of the
  requests after the first (the first computes the shared blocks either way), and the prompt tokens
  the engine computed for them;
- n choices: one request of ``--system-tokens`` + question tokens with ``--n`` choices (the server
  queues choices 1..n-1 with ``prefix_leader``); the time until every choice has its first token,
  and the prompt tokens computed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from balcony_runtime.decode_benchmark import machine_line
from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import load_model
from balcony_runtime.sampling_params import SamplingParams

SYSTEM_WORDS = ("You are a careful assistant for a river-shipping company. Answer in one sentence, "
                "name the river and the country, and say when you are unsure. ")


def first_token_seconds(engine: LLMEngine, ids: list[str]) -> tuple[float, int]:
    """Seconds until every request of ``ids`` has its first token, and the prompt tokens computed
    for them (prompt minus what the prefix cache served)."""
    start, computed, waiting = time.perf_counter(), 0, set(ids)
    while waiting:
        for out in engine.step():
            if out.request_id in waiting and out.new_token_ids:
                waiting.discard(out.request_id)
                computed += out.num_prompt_tokens - out.num_cached_tokens
    seconds = time.perf_counter() - start
    for rid in ids:
        engine.abort(rid)
    return seconds, computed


def system_prompt(tokenizer, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(SYSTEM_WORDS, add_special_tokens=False)
    return ids[:tokens]


def run(args) -> str:
    torch.set_num_threads(args.threads)
    loaded = load_model(dtype=args.dtype, device="cpu")
    system = system_prompt(loaded.tokenizer, args.system_tokens)
    questions = [loaded.tokenizer.encode(f" Question {i}: where does river number {i} reach the sea?",
                                         add_special_tokens=False) for i in range(args.questions)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rows = []
    for caching in (False, True):
        engine = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=2048, prefix_caching=caching))
        engine.generate([[7, 8, 9] * 40], params)  # warm-up on an unrelated prompt
        ttft, computed = [], []
        for q in questions:
            seconds, tokens = first_token_seconds(engine, [engine.add_request(system + q, params)])
            ttft.append(seconds)
            computed.append(tokens)
        later = slice(1, None)
        choice_params = [SamplingParams(max_tokens=1, temperature=1.0, seed=s) for s in range(args.n)]
        prompt = system[::-1] + questions[0]  # shares no block with what either engine has seen
        leader = engine.add_request(prompt, choice_params[0])
        ids = [leader] + [engine.add_request(prompt, p, prefix_leader=leader) for p in choice_params[1:]]
        n_seconds, n_tokens = first_token_seconds(engine, ids)
        rows.append((caching, 1e3 * statistics.median(ttft[later]), statistics.mean(computed[later]),
                     1e3 * ttft[0], 1e3 * n_seconds, n_tokens, len(prompt)))
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    lines = [f"{args.system_tokens}-token system prompt + {len(questions[0])}-token questions, {args.questions} "
             f"requests one after another; n={args.n} choices of one {rows[0][6]}-token prompt. Full depth, "
             f"{dtype}, {machine_line(loaded, args.system_tokens)}", "",
             "| prefix cache | TTFT, later requests (median ms) | prompt tokens computed per later request "
             "| TTFT, first request (ms) | n choices: all first tokens (ms) | n choices: prompt tokens computed |",
             "|---|---|---|---|---|---|"]
    for caching, ttft_ms, tokens, first_ms, n_ms, n_tokens, _ in rows:
        lines.append(f"| {'on' if caching else 'off'} | {ttft_ms:.1f} | {tokens:.0f} | {first_ms:.1f} | "
                     f"{n_ms:.1f} | {n_tokens} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    body = run(args)
    print(body)
    from decode_throughput import write_section  # bench/ is on sys.path when run as a script

    command = "python bench/prefix_caching.py" + (
        f" --system-tokens {args.system_tokens}" if args.system_tokens != 512 else "")
    write_section(args.out, "prefix-caching", body, command)


if __name__ == "__main__":
    main()
