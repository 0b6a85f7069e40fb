"""Time of one refit's solve of the step-cost model (routing/step_cost.py: nnls) over a full window.

    python bench/step_cost_refit.py

The live model refits every 16 steps on the calibration steps plus up to 512 live ones, on the step
loop; this times the solve over 632 rows of decode-step shapes (1-256 rows at exits 8, 15, 22 and
full, contexts up to 4,096). docs/benchmarks.md, "The server around the step".
"""

from __future__ import annotations

import random
import time

import numpy as np

from balcony_runtime.routing.step_cost import RowShape, StepShape, nnls


def main() -> None:
    rng = random.Random(0)
    a = np.array([StepShape.of([RowShape(rng.choice([8, 15, 22, 30]), 1, rng.randint(0, 4000))
                                for _ in range(rng.randint(1, 256))], 30).features() for _ in range(632)], dtype=float)
    b = np.ones(len(a))
    start = time.perf_counter()
    for _ in range(50):
        nnls(a, b)
    print(f"nnls over {a.shape}: {1e3 * (time.perf_counter() - start) / 50:.2f} ms")


if __name__ == "__main__":
    main()
