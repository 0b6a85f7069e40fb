"""One-row decode steps of the default model stepped from the main thread, then from a second one.

    python bench/step_thread.py

Each thread that runs an OpenMP-parallel torch op keeps a team of libgomp workers while it lives;
with more such threads than cores, libgomp lets waiting workers sleep almost at once, and every
parallel product of a step pays a wake-up. The second thread here runs while the main thread's
team is alive (as `balcony serve`'s step loop did beside asyncio's executor thread, which loaded
the model), the third after the thread that first ran torch has exited. docs/benchmarks.md,
"One OpenMP team".
"""

from __future__ import annotations

import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from balcony_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from balcony_runtime.loader import load_model  # noqa: E402
from balcony_runtime.sampling_params import SamplingParams  # noqa: E402


def median_step_ms(engine: LLMEngine, tokens: int = 257) -> float:
    engine.add_request("The history of the printing press", SamplingParams(max_tokens=tokens, temperature=0,
                                                                            ignore_eos=True), exit_layer="full")
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", fn()))
    thread.start()
    thread.join()
    return box["out"]


def main() -> None:
    # Loaded in a thread that ends: the main thread has no OpenMP team yet.
    engine = in_thread(lambda: LLMEngine(load_model(quantization="auto"), EngineConfig()))
    print(f"kernels {engine.model.ops.name}, weights {engine.model.quantization}")
    print(f"alone, in a thread (the loading thread has exited): {in_thread(lambda: median_step_ms(engine)):.2f} ms")
    print(f"from the main thread:                               {median_step_ms(engine):.2f} ms")
    print(f"in a new thread, the main thread's team alive:      {in_thread(lambda: median_step_ms(engine)):.2f} ms")


if __name__ == "__main__":
    main()
