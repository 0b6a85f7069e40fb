"""bench/scheduler_finish.py: finishing every running request empties the scheduler and frees the
pool, with this checkout's Request and with an older revision's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from balcony_runtime.request import Request

ROOT = Path(__file__).resolve().parents[2]


def test_finishing_every_request_is_timed(bench_script):
    with bench_script("scheduler_finish") as bench:
        assert bench.finish_us(Request, running=8, layers=3) > 0


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
                    reason="needs the repository's git history")
def test_an_old_revisions_request_class_is_loaded_from_git(bench_script):
    with bench_script("scheduler_finish") as bench:
        old = bench.request_class_of("HEAD")
        assert old.__module__ == "_old_request" and old is not Request
        assert bench.finish_us(old, running=8, layers=3) > 0
