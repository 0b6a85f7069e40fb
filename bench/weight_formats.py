"""The matrices of a decode step in every CPU weight format, timed as `--dtype/--quantization auto`
times them at start-up (balcony_runtime/weight_format.py), including the lossy formats auto skips.

    python bench/weight_formats.py [--model smollm2-135m]

Prints ms per pass over enough decoder layers to leave the caches plus the head, at 1 and 16 rows,
and the effective bytes read per second at 1 row.
"""

from __future__ import annotations

import argparse

import torch

from balcony_runtime.config import ModelArch
from balcony_runtime.model_source import resolve_model
from balcony_runtime.weight_format import ROWS, candidate_label, time_candidate, timing_matrices

FORMATS = [(torch.float32, "none"), (torch.bfloat16, "none"), (torch.float32, "fp16"),
           (torch.float32, "int8"), (torch.bfloat16, "int8")]
BYTES = {"none": None, "fp16": 2, "int8": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    from transformers import AutoConfig

    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(resolve_model(args.model).path))
    matrices = timing_matrices(arch)
    elements = sum(m.numel() for m in matrices)
    print(f"{len(matrices) - 1} layer matrices + head, {elements / 1e6:.1f}M weights, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print(f"| format | ms at {' / '.join(map(str, ROWS))} rows | GB/s read at 1 row | vs float32 at 1 / 16 rows |")
    print("|---|---|---|---|")
    base = None
    for dtype, fmt in FORMATS:
        ms = time_candidate(matrices, dtype, fmt)
        size = BYTES[fmt] or torch.finfo(dtype).bits // 8
        base = base or ms
        print(f"| {candidate_label(dtype, fmt)} | {' / '.join(f'{t:.1f}' for t in ms)} | "
              f"{elements * size / ms[0] / 1e6:.1f} | {base[0] / ms[0]:.2f}x / {base[1] / ms[1]:.2f}x |")


if __name__ == "__main__":
    main()
