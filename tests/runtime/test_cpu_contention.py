"""CPU time of other processes during a measurement, from a /proc/stat written by the test."""

from __future__ import annotations

import os
import time

from balcony_runtime.cpu_contention import CpuContention


def test_cpu_contention_counts_other_processes_only(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 5 0 0 0 0 0\ncpu0 1 2 3\n")
    contention = CpuContention(stat)
    contention.start()
    ticks = os.sysconf("SC_CLK_TCK")
    # one core's worth of others' time while this process sleeps: the machine ran busy meanwhile
    t0 = time.perf_counter()
    time.sleep(0.2)
    wall = time.perf_counter() - t0
    stat.write_text(f"cpu  {100 + int(wall * ticks * 1.0) + 1} 0 50 1000 5 0 0 0 0 0\n")
    assert 0.8 <= contention.others_cores() <= 1.3
    assert CpuContention(tmp_path / "missing").others_cores() is None
