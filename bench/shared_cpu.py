"""One-row decode steps of the default model while another process keeps a core busy.

    python bench/shared_cpu.py [--steps 32] [--hog-threads 1]

Starts a CPU hog (a Python busy loop per --hog-threads), then steps one full-depth request with
the engine's default thread count (torch's: the cores), then with the thread count a
ThreadGovernor picks (balcony_runtime/cpu_threads.py, as `balcony serve`'s step loop does), then
once more after the hog is stopped with the governor widening back. Prints median ms per step.
Results: docs/benchmarks.md, "Sharing the CPU".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from balcony_runtime.cpu_threads import ThreadGovernor  # noqa: E402
from balcony_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from balcony_runtime.loader import load_model  # noqa: E402
from balcony_runtime.sampling_params import SamplingParams  # noqa: E402


def median_step_ms(engine: LLMEngine, steps: int, governor: ThreadGovernor | None = None) -> float:
    engine.add_request("The history of the printing press", SamplingParams(max_tokens=steps + 1, temperature=0,
                                                                            ignore_eos=True), exit_layer="full")
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished():
        if governor is not None:
            governor.tick()
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--hog-threads", type=int, default=1)
    args = parser.parse_args()
    engine = LLMEngine(load_model(quantization="auto"), EngineConfig())
    full = torch.get_num_threads()
    print(f"kernels {engine.model.ops.name}, weights {engine.model.quantization}, {full} threads")
    print(f"alone, {full} threads: {median_step_ms(engine, args.steps):.2f} ms")
    # In a session of its own, as another service or user's job would be: where the kernel groups
    # CPU time by session (autogroup), our whole team then shares what one group gets.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(args.hog_threads)]
    try:
        time.sleep(0.5)
        print(f"beside {args.hog_threads} busy process(es), {full} threads: {median_step_ms(engine, args.steps):.2f} ms")
        governor = ThreadGovernor(full=full, interval_s=0.25)
        governor.tick()
        time.sleep(0.3)  # one window of the hog alone, as between requests
        ms = median_step_ms(engine, args.steps, governor)
        print(f"beside them, governed ({governor.threads} threads, others {governor.others:.1f} cores): {ms:.2f} ms")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    time.sleep(0.6)
    ms = median_step_ms(engine, args.steps * 4, governor)
    print(f"hog stopped, governed ({governor.threads} threads): {ms:.2f} ms")


if __name__ == "__main__":
    main()
