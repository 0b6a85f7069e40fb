"""What the presence and frequency penalties cost the host per step, by rows and generated length.

A penalized row's step counts every token it has generated (balcony_runtime/sampler.py,
``apply_penalties_``), so the cost grows with rows x tokens generated; an operator who sets a
penalty for every request (``balcony serve --override-generation-config``) pays it on every row.
Times ``apply_penalties_`` alone on random token ids of the default model's vocabulary (median of
--repeats calls, torch on --threads threads):

    python bench/penalty_cost.py
    python bench/penalty_cost.py --sizes 16x256,64x512 --presence-penalty 0.5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from balcony_runtime.sampler import SamplingRow, apply_penalties_
from balcony_runtime.sampling_params import SamplingParams

VOCAB = 49152  # SmolLM2's


def time_penalties(rows: int, generated: int, frequency: float, presence: float, repeats: int) -> float:
    """Median milliseconds of one apply_penalties_ call over a [rows, VOCAB] float32 batch."""
    rng = random.Random(0)
    params = SamplingParams(max_tokens=generated + 1, temperature=0.0, frequency_penalty=frequency,
                            presence_penalty=presence)
    batch = [SamplingRow(params, [rng.randrange(VOCAB) for _ in range(generated)], None) for _ in range(rows)]
    logits = torch.randn(rows, VOCAB)
    apply_penalties_(logits, batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        apply_penalties_(logits, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16x256,64x512,256x1024", help="ROWSxGENERATED, comma-separated")
    parser.add_argument("--frequency-penalty", type=float, default=0.5)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"frequency_penalty {args.frequency_penalty}, presence_penalty {args.presence_penalty}, "
          f"{args.threads} torch threads")
    print("| rows | tokens generated each | ms a step |")
    print("|---|---|---|")
    for size in args.sizes.split(","):
        rows, generated = (int(x) for x in size.lower().split("x"))
        ms = time_penalties(rows, generated, args.frequency_penalty, args.presence_penalty, args.repeats)
        print(f"| {rows} | {generated} | {ms:.2f} |")


if __name__ == "__main__":
    main()
