"""Time each native CPU kernel against its torch reference at the default model's shapes.

    python bench/native_kernels.py

One call of each, microseconds (best of three runs of many calls), torch's default thread count.
The kernels are compiled into a temporary folder first. Results: docs/benchmarks.md, "Native kernels".
"""

from __future__ import annotations

import tempfile
import timeit
from pathlib import Path

import torch

from kernels import cpu_decode, reference
from kernels.cpu_native import NativeKernels, build

HQ, HK, D, BLOCK = 9, 3, 64, 16  # SmolLM2-135M's heads and the engine's block size


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def attention_case(rows: int, keys: int):
    g = torch.Generator().manual_seed(0)
    blocks = rows * (keys // BLOCK + 2)
    k_cache, v_cache = torch.randn(blocks, BLOCK, HK, D, generator=g), torch.randn(blocks, BLOCK, HK, D, generator=g)
    lens = torch.full((rows,), keys, dtype=torch.int32)
    positions = (lens - 1).long()
    tables = torch.arange(blocks, dtype=torch.int32).view(rows, -1)
    slots = tables.long().gather(1, (positions // BLOCK)[:, None]).squeeze(1) * BLOCK + positions % BLOCK
    q, k, v = torch.randn(rows, (HQ + 2 * HK) * D, generator=g).split([HQ * D, HK * D, HK * D], dim=-1)
    cos, sin = torch.randn(8192, D // 2, generator=g), torch.randn(8192, D // 2, generator=g)
    decode = cpu_decode.decode_tables(cos, sin, positions, lens, keys, k_cache, v_cache)
    return (q.view(rows, HQ, D), k.view(rows, HK, D), v.view(rows, HK, D), decode, slots, tables, D ** -0.5)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        native = NativeKernels.open(build(Path(folder)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| kernel | native us | torch us |\n|---|---|---|")
    g = torch.Generator().manual_seed(1)
    x, r, w = torch.randn(1, 576, generator=g), torch.randn(1, 576, generator=g), torch.randn(576, generator=g)
    print(f"| add + RMSNorm, 1 x 576 | {best_us(lambda: native.rms_norm(x, w, 1e-5, r), 5000):.1f} | "
          f"{best_us(lambda: reference.rms_norm(x, w, 1e-5, r), 5000):.1f} |")
    gate_up = torch.randn(1, 3072, generator=g)
    print(f"| SwiGLU activation, 1 x 3,072 | {best_us(lambda: native.silu_mul(gate_up), 5000):.1f} | "
          f"{best_us(lambda: reference.silu_mul(gate_up), 5000):.1f} |")
    for rows, keys in ((1, 200), (1, 2000), (16, 200), (16, 1000)):
        args = attention_case(rows, keys)
        print(f"| RoPE + cache write + attention, {rows} row(s), {keys:,} keys | "
              f"{best_us(lambda: native.attend(*args), 200):.1f} | "
              f"{best_us(lambda: cpu_decode.attend(*args), 200):.1f} |")


if __name__ == "__main__":
    main()
