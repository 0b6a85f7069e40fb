"""A decode step's matrix products on the CPU: the native fp16 product against FBGEMM and oneDNN.

    python bench/fp16_products.py [--rows 1,2,3,4,8,16] [--out bench/results/fp16_products.json]

The products of one full-depth step of the default model (SmolLM2-135M: 30 layers x qkv, o,
gate_up, down, then the 49,152 x 576 head; 269 MB of fp16 weights, random values), timed at each
row count in three ways: FBGEMM's fp16 GEMM (torch's ``linear_dynamic_fp16``), the native fp16
product (kernels/native/fp16_linear.c, blocked layout), and oneDNN's bf16 linear where the CPU has
it. The three alternate within each repeat so a drift in the machine's memory bandwidth (shared
VMs drift by 2x within minutes) hits all of them alike; the best repeat is kept. Also the fixed
cost of one call (a 16 x 576 weight). torch's default thread count. Results: docs/benchmarks.md,
"fp16 products in C".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import timeit
from pathlib import Path

import torch

from kernels import cpu_native

HIDDEN, INTER, VOCAB, LAYERS = 576, 1536, 49152, 30


def step_shapes() -> list[tuple[int, int]]:
    return [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,8,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    native = cpu_native.open_built(Path(tempfile.gettempdir()) / "balcony-native")
    if not native.fp16_linear_fast:
        raise SystemExit("the native fp16 product is not vectorized and threaded here (no AVX-512 or no OpenMP)")
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    shapes = step_shapes()
    g = torch.Generator().manual_seed(0)
    dense = [torch.empty(n, k).uniform_(-0.05, 0.05, generator=g) for n, k in shapes]
    fbgemm = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in dense]
    blocked = [cpu_native.block_fp16(w) for w in dense]
    bf16 = [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 16) for w in dense] if onednn else []
    del dense

    results = {"threads": torch.get_num_threads(), "weights_mb": sum(n * k for n, k in shapes) * 2 / 1e6,
               "per_call_us": {}, "step_ms": {}}
    for rows in map(int, args.rows.split(",")):
        x = {k: torch.randn(rows, k, generator=g) for k in (HIDDEN, INTER)}
        ways = {
            "fbgemm fp16": lambda: [torch.ops.quantized.linear_dynamic_fp16(x[k], w) for w, (n, k) in zip(fbgemm, shapes)],
            "native fp16": lambda: [native.fp16_linear(x[k], w, n) for w, (n, k) in zip(blocked, shapes)],
        }
        if onednn:
            xb = {k: v.bfloat16() for k, v in x.items()}
            ways["onednn bf16"] = lambda: [torch.ops.mkldnn._linear_pointwise(xb[k], w, None, "none", [], "")
                                           for w, (n, k) in zip(bf16, shapes)]
        best = {name: float("inf") for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                fn()  # warm
                start = time.perf_counter()
                for _ in range(4):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / 4 * 1e3)
        results["step_ms"][rows] = best
        print(f"{rows:>3} rows: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in best.items()), flush=True)

    x = torch.randn(1, HIDDEN)
    w = torch.randn(16, HIDDEN)
    small_fbgemm, small_blocked = torch.ops.quantized.linear_prepack_fp16(w, None), cpu_native.block_fp16(w)
    calls = {"fbgemm fp16": lambda: torch.ops.quantized.linear_dynamic_fp16(x, small_fbgemm),
             "native fp16": lambda: native.fp16_linear(x, small_blocked, 16)}
    for name, fn in calls.items():
        results["per_call_us"][name] = min(timeit.repeat(fn, number=2000, repeat=3)) / 2000 * 1e6
    print("one call of a 16 x 576 weight: " + ", ".join(f"{n} {us:.1f} us" for n, us in results["per_call_us"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
