"""The engine process's side of a step: engine.step() plus what goes down the pipe, with the engine
building output objects (then taken apart into tuples, as the engine process did before stop 37)
against building the tuples directly (LLMEngine.emit_rows, what it does now).

    python bench/engine_rows.py                     # 64 x 256 and 256 x 1,024
    python bench/engine_rows.py --shape 256x4096 --steps 64

Two engines on the host-only benchmark's stub model (balcony_runtime/host_step_benchmark.py: the
forward replaced, schedule, prepare, sample, detokenization and outputs real), stepped in turn;
each step's time is this thread's CPU time for the step, the rows and pickling the message the
engine process sends. Prints the median milliseconds per step of each.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from operator import attrgetter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from balcony_runtime.request_output import RequestOutput  # noqa: E402
from balcony_runtime.heap import serving_heap  # noqa: E402
from balcony_runtime.host_step_benchmark import HostStepRun  # noqa: E402
from balcony_runtime.loader import load_model  # noqa: E402

_fields_of = attrgetter(*RequestOutput.__slots__)  # an object taken apart, as the pipe's sender did


def measure(loaded, rows: int, context: int, steps: int) -> dict[str, float]:
    runs = {"objects, then tuples": HostStepRun(loaded, rows, context, steps + 2),
            "rows (emit_rows)": HostStepRun(loaded, rows, context, steps + 2)}
    runs["rows (emit_rows)"].engine.emit_rows()
    times: dict[str, list[float]] = {name: [] for name in runs}
    with serving_heap():  # as serve.py's builder does
        names = list(runs)
        for i in range(steps):
            for name in names if i % 2 else names[::-1]:  # each goes first every other step
                engine = runs[name].engine
                start = time.thread_time()
                outputs = engine.step()
                if name.startswith("objects"):
                    outputs = [_fields_of(out) for out in outputs]
                pickle.dumps(("outputs", outputs, (0, 0, 0.0, None)), protocol=pickle.HIGHEST_PROTOCOL)
                times[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="ROWSxCONTEXT (repeatable; default 64x256 and 256x1024)")
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    print("| rows x context | objects, then tuples (ms) | rows (ms) |\n|---|---|---|")
    for shape in args.shape or ["64x256", "256x1024"]:
        rows, context = (int(x) for x in shape.split("x"))
        result = measure(loaded, rows, context, args.steps)
        print(f"| {rows} x {context} | {result['objects, then tuples']:.3f} | {result['rows (emit_rows)']:.3f} |")


if __name__ == "__main__":
    main()
