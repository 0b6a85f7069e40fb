"""Fewer compute threads while other processes hold the CPU, all of them again when they stop.

A CPU step runs each product on an OpenMP team as wide as torch's thread count (the cores), and
each product ends at a barrier that waits for every thread of the team. When another process keeps
a core busy, the scheduler gives that core to our worker only between the other process's time
slices, so every product of the step waits milliseconds at its barrier: on a 2-core VM beside a
one-thread training job, a one-row step's products took over 900 ms on two threads and 7 ms on
one (docs/benchmarks.md, "Sharing the CPU"). So the step loop asks a :class:`ThreadGovernor`
before each step; every ``interval_s`` it reads how many cores other processes used
(cpu_contention.py) and narrows the team to the cores they leave, or widens it back once they
use less than ``idle_cores`` (a lower mark than the one that narrows: no flapping at the edge).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from balcony_runtime.cpu_contention import BUSY_CORES, CpuContention

log = logging.getLogger("balcony.engine")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_left(full: int, cores: int, others: float) -> int:
    """The team width that leaves other processes the cores they use (at least one thread)."""
    return max(1, min(full, cores - math.ceil(others - 0.05)))


@dataclass
class ThreadGovernor:
    full: int  # the team width when the machine is ours (torch's thread count at start)
    cores: int = field(default_factory=available_cores)
    interval_s: float = 0.5  # how often others' use is read (one /proc/stat read each time)
    busy_cores: float = BUSY_CORES  # others at or above this: narrow the team
    idle_cores: float = 0.25  # others below this: the full team again
    clock: Callable[[], float] = time.monotonic
    contention: Callable[[], CpuContention] = CpuContention
    set_threads: Callable[[int], None] = torch.set_num_threads
    threads: int = field(init=False)
    others: float | None = field(init=False, default=None)  # cores others used over the last window
    _window: CpuContention | None = field(init=False, default=None)
    _window_start: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.threads = self.full

    def tick(self) -> int:
        """Call before each step (on the thread that steps). Returns the thread count to step with,
        having applied it when it changed."""
        now = self.clock()
        if self._window is None:
            self._start_window(now)
            return self.threads
        if now - self._window_start < self.interval_s:
            return self.threads
        others = self._window.others_cores()
        self._start_window(now)
        if others is None:  # no /proc/stat here: nothing to go by
            return self.threads
        self.others = others
        if others >= self.busy_cores:
            target = threads_left(self.full, self.cores, others)
        elif others < self.idle_cores:
            target = self.full
        else:
            target = self.threads
        if target != self.threads:
            log.info("other processes use %.1f of %d cores: stepping on %d of %d threads", others, self.cores,
                     target, self.full)
            self.set_threads(target)
            self.threads = target
        return self.threads

    def _start_window(self, now: float) -> None:
        self._window = self.contention()
        self._window.start()
        self._window_start = now
