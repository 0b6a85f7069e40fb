"""What a step costs on each side of the engine process's pipe: the engine process's (engine.step(),
the rows, pickling the message) and the HTTP process's (unpickling it, making the RequestOutputs
its streams read: server/engine_process.request_outputs), with a steady decode's plain rows sent
as columns (request_output.StepOutputs, the default) against a tuple per row (LLMEngine.emit_rows
alone, what the engine did before stop 41: engine.steady_columns False).

    python bench/engine_rows.py                     # 64 x 256 and 256 x 1,024
    python bench/engine_rows.py --shape 256x4096 --steps 64

Two engines on the host-only benchmark's stub model (balcony_runtime/host_step_benchmark.py: the
forward replaced, schedule, prepare, sample, detokenization and outputs real), stepped in turn;
each side's time is this thread's CPU time. Prints the median milliseconds per step of each.
(Before stop 41 this compared objects taken apart into tuples against emit_rows' tuples:
docs/benchmarks.md, "Outputs as rows".)
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from balcony_runtime.heap import serving_heap  # noqa: E402
from balcony_runtime.host_step_benchmark import HostStepRun  # noqa: E402
from balcony_runtime.loader import load_model  # noqa: E402
from server.engine_process import request_outputs  # noqa: E402

WAYS = ("rows", "columns")


def measure(loaded, rows: int, context: int, steps: int) -> dict[str, dict[str, float]]:
    """Median ms per step, {way: {"engine": ..., "http": ...}}."""
    runs = {way: HostStepRun(loaded, rows, context, steps + 2) for way in WAYS}
    for way, run in runs.items():
        run.engine.emit_rows()
        run.engine.steady_columns = way == "columns"
    times: dict[str, dict[str, list[float]]] = {way: {"engine": [], "http": []} for way in WAYS}
    with serving_heap():  # as serve.py's builder does
        for i in range(steps):
            for way in WAYS if i % 2 else WAYS[::-1]:  # each goes first every other step
                engine = runs[way].engine
                start = time.thread_time()
                message = pickle.dumps(("outputs", engine.step(), (0, 0, 0.0, None)), protocol=pickle.HIGHEST_PROTOCOL)
                sent = time.thread_time()
                outputs = request_outputs(pickle.loads(message)[1])
                for _ in outputs:  # (each stream reads its row)
                    pass
                times[way]["engine"].append(sent - start)
                times[way]["http"].append(time.thread_time() - sent)
    return {way: {side: 1e3 * statistics.median(v) for side, v in sides.items()} for way, sides in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="ROWSxCONTEXT (repeatable; default 64x256 and 256x1024)")
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    print("| rows x context | engine process, rows (ms) | engine process, columns (ms) "
          "| HTTP process, rows (ms) | HTTP process, columns (ms) |\n|---|---|---|---|---|")
    for shape in args.shape or ["64x256", "256x1024"]:
        rows, context = (int(x) for x in shape.split("x"))
        r = measure(loaded, rows, context, args.steps)
        print(f"| {rows} x {context} | {r['rows']['engine']:.3f} | {r['columns']['engine']:.3f} "
              f"| {r['rows']['http']:.3f} | {r['columns']['http']:.3f} |")


if __name__ == "__main__":
    main()
