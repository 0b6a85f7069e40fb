"""Greedy sampling's argmax on a CPU: torch's kernel against the sampler's row_argmax (numpy's).

    python bench/greedy_argmax.py                    # the reduction alone, then engine decode steps
    python bench/greedy_argmax.py --rows 16 --rows 64 --rounds 3

First the argmax alone over [rows, 49,152] fp32 logits (one torch thread, microseconds per call),
then the mean time of the real model's decode steps (fp32 weights, greedy, 24 tokens;
balcony_runtime.decode_benchmark) with
the sampler's argmax swapped between the two, alternating, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import balcony_runtime.sampler as sampler  # noqa: E402


def per_call_us(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="rows per step (repeatable; default 16, 64)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows_list = args.rows or [16, 64]
    fast, slow = sampler.row_argmax, (lambda x: x.argmax(dim=-1))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("| rows x vocab | torch argmax us | row_argmax us |\n|---|---|---|")
    for rows in [1, *rows_list]:
        x = torch.randn(rows, 49152)
        assert torch.equal(fast(x), slow(x))
        print(f"| {rows} x 49152 | {per_call_us(lambda: slow(x)):.1f} | {per_call_us(lambda: fast(x)):.1f} |")
    torch.set_num_threads(threads)

    from balcony_runtime.decode_benchmark import engine_decode_rate
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.loader import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    print(f"\n{threads} torch threads, fp32 weights; mean ms per decode step, one value per round\n")
    print("| rows | torch argmax | row_argmax |\n|---|---|---|")
    for rows in rows_list:
        step_ms = {"torch": [], "numpy": []}
        for _ in range(args.rounds):
            for name, argmax in (("torch", slow), ("numpy", fast)):
                sampler.row_argmax = argmax
                engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=4096, max_num_seqs=rows))
                step_ms[name].append(1e3 * engine_decode_rate(engine, rows, None, 24)[1])
        sampler.row_argmax = fast
        print(f"| {rows} | {' / '.join(f'{m:.1f}' for m in step_ms['torch'])} | "
              f"{' / '.join(f'{m:.1f}' for m in step_ms['numpy'])} |", flush=True)


if __name__ == "__main__":
    main()
