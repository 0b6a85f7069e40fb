"""Microseconds for the scheduler to let a request go, with N running: finish, as when a stream
ends or its client goes away.

    python bench/scheduler_finish.py                   # 64, 256 and 1,024 running
    python bench/scheduler_finish.py --running 256 --revision 654022f   # and that revision's Request

Builds a Scheduler over a BlockManager with N running requests (256-token prompts, one block
table each) and finishes them all, newest first (each one is then last in the running list, so
it is found after passing every other): median microseconds per finish. ``--revision`` also times
the same with that revision's ``Request`` class loaded from git (the scheduler is this checkout's).
"""

from __future__ import annotations

import argparse
import statistics
import time

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request, RequestStatus
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.scheduler import Scheduler, SchedulerConfig


def request_class_of(revision: str) -> type:
    """``revision``'s Request class, loaded from git as bench/host_step.py loads its step code."""
    from host_step import old_modules  # a sibling script, as when run from bench/

    return old_modules(revision)["request"].Request


def finish_us(request_class: type, running: int, layers: int = 31) -> float:
    blocks = BlockManager(num_blocks=running * layers * 17, block_size=16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=running), blocks)
    params = SamplingParams(max_tokens=16)
    requests = []
    for i in range(running):
        request = request_class(f"r{i}", list(range(256)), params, 30, layers, 0.0)
        request.status = RequestStatus.RUNNING  # this checkout's enum, which the scheduler reads
        blocks.allocate(request.request_id, layers, 257)
        scheduler.running.append(request)
        requests.append(request)
    times = []
    for request in reversed(requests):
        start = time.perf_counter()
        scheduler.finish(request, "stop")
        times.append(time.perf_counter() - start)
    if scheduler.running or blocks.num_free_blocks != blocks.num_blocks:
        raise RuntimeError("finishing every request left some running or some blocks held")
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", type=int, action="append",
                        help="requests running (repeatable; default 64, 256, 1024)")
    parser.add_argument("--revision", help="also time with this git revision's Request class")
    args = parser.parse_args()
    classes = [("this checkout", Request)]
    if args.revision:
        classes.insert(0, (args.revision, request_class_of(args.revision)))
    print("| Request of | running | us per finish (median) |")
    print("|---|---|---|")
    for running in args.running or [64, 256, 1024]:
        for label, cls in classes:
            print(f"| {label} | {running} | {finish_us(cls, running):.1f} |", flush=True)


if __name__ == "__main__":
    main()
