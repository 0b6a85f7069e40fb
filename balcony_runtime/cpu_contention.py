"""How much of the CPU other processes took while something was measured.

Start-up measurements (the weight format, the step-cost calibration) are cached per machine; one
taken while another job held the cores would keep that moment's verdict for every later start.
So a measurement reads the machine's busy time from Linux's /proc/stat (steal included, since a
hypervisor's share slows us alike) less this process's own CPU time, and callers cache only what
was measured while others used less than ``BUSY_CORES``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BUSY_CORES = 0.5  # other processes using this many cores or more during a measurement: not cached


class CpuContention:
    """CPU time other processes take while something is measured, from Linux's /proc/stat (the
    whole machine's busy time, steal included) less this process's own; None where unavailable."""

    def __init__(self, stat: Path = Path("/proc/stat")):
        self.stat = stat
        self._start: tuple[float, float, float] | None = None

    def _busy_seconds(self) -> float | None:
        try:
            # The first line: "cpu user nice system idle iowait irq softirq steal ...", in clock ticks.
            fields = self.stat.read_text().split("\n", 1)[0].split()
            ticks = [int(v) for v in fields[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]  # not idle, not iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        busy = self._busy_seconds()
        self._start = None if busy is None else (busy, time.process_time(), time.perf_counter())

    def others_cores(self) -> float | None:
        """Average cores used by other processes since start()."""
        busy = self._busy_seconds()
        if self._start is None or busy is None:
            return None
        busy0, own0, wall0 = self._start
        wall = time.perf_counter() - wall0
        others = (busy - busy0) - (time.process_time() - own0)
        return max(0.0, others / wall) if wall > 0 else None
