"""bench/host_step.py --baseline: an older revision's step code, built into its own engine and
stepped in turn with this checkout's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from balcony_runtime.host_step_benchmark import HostStepRun, measure_interleaved
from balcony_runtime.loader import load_model

ROOT = Path(__file__).resolve().parents[2]


def _has_history() -> bool:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_history(), reason="needs the repository's git history")
def test_an_old_revision_and_this_checkout_step_in_turn(bench_script, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    with bench_script("host_step") as host_step:
        old = host_step.old_modules("HEAD")
        with host_step.engine_with(old):
            then = HostStepRun(loaded, rows=3, context=20, steps=4)
        now = HostStepRun(loaded, rows=3, context=20, steps=4)
    # Each engine keeps the classes it was built with, whatever the module holds later.
    assert type(then.engine.runner.input_batch).__module__ == "_old_input_batch"
    assert type(then.engine.runner.sampler).__module__ == "_old_sampler"
    assert type(now.engine.runner.input_batch).__module__ == "balcony_runtime.input_batch"
    results = measure_interleaved([then, now], steps=4)
    assert len(then.cpu) == len(now.cpu) == 4  # one step of each in turn
    for r in results:
        assert (r.rows, r.context) == (3, 20)
        assert r.step_cpu_ms > 0 and set(r.phase_ms) >= {"schedule", "prepare", "sample", "postprocess"}
    # Same requests, same greedy stub: both versions produced the same tokens.
    tokens = [[t.request.output_token_ids for t in run.engine._tracked.values()] for run in (then, now)]
    assert tokens[0] == tokens[1]
