"""The thread governor: narrows the OpenMP team while other processes hold cores, widens it back."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from balcony_runtime.cpu_contention import CpuContention
from balcony_runtime.cpu_threads import ThreadGovernor, threads_left


class Readings:
    """Stands in for CpuContention: each window reports the next of ``values`` (cores others used)."""

    def __init__(self, values: list[float | None]):
        self.values = list(values)

    def __call__(self) -> "Readings":
        return self

    def start(self) -> None:
        pass

    def others_cores(self) -> float | None:
        return self.values.pop(0)


def governor(values, full=4, cores=4):
    clock = [0.0]
    applied: list[int] = []
    g = ThreadGovernor(full=full, cores=cores, interval_s=1.0, clock=lambda: clock[0], contention=Readings(values),
                       set_threads=applied.append)
    return g, clock, applied


def test_threads_left_leaves_others_their_cores():
    assert threads_left(2, 2, 1.0) == 1
    assert threads_left(2, 2, 0.6) == 1
    assert threads_left(2, 2, 3.0) == 1  # never below one
    assert threads_left(8, 8, 2.5) == 5
    assert threads_left(4, 16, 2.0) == 4  # never above the full team


def test_narrows_under_load_and_widens_only_when_others_are_nearly_idle():
    g, clock, applied = governor([2.0, 0.4, 0.1, 0.6, None])
    assert g.tick() == 4  # first call opens a window
    clock[0] = 0.5
    assert g.tick() == 4 and applied == []  # inside the window: nothing read
    clock[0] = 1.0
    assert g.tick() == 2 and applied == [2]  # others used 2 of 4 cores
    clock[0] = 2.0
    assert g.tick() == 2 and applied == [2]  # 0.4: between the marks, stays narrow
    clock[0] = 3.0
    assert g.tick() == 4 and applied == [2, 4]  # 0.1: the machine is ours again
    clock[0] = 4.0
    assert g.tick() == 3 and applied == [2, 4, 3]  # 0.6 rounds up to one core taken
    clock[0] = 5.0
    assert g.tick() == 3 and g.others == 0.6  # no reading (no /proc/stat): unchanged


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/stat")
def test_a_real_cpu_hog_is_seen_and_the_team_narrows(tmp_path):
    applied: list[int] = []
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        g = ThreadGovernor(full=2, cores=2, interval_s=0.5, contention=CpuContention, set_threads=applied.append)
        g.tick()
        time.sleep(0.6)  # this process idles; the hog takes a core
        assert g.tick() == 1 and applied == [1]
        assert g.others is not None and g.others >= 0.5
    finally:
        hog.kill()
        hog.wait()
