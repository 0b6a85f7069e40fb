"""bench/host_step.py --baseline: an older revision's step code, built into its own engine and
stepped in turn with this checkout's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from balcony_runtime.host_step_benchmark import HostStepRun, every_depth, measure_interleaved
from balcony_runtime.loader import load_model

ROOT = Path(__file__).resolve().parents[2]


def _has_history() -> bool:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_history(), reason="needs the repository's git history")
def test_an_old_revision_and_this_checkout_step_in_turn(bench_script, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    with bench_script("host_step") as host_step:
        old = host_step.old_modules("HEAD")
        then = HostStepRun(loaded, rows=3, context=20, steps=4, engine_module=old["engine"])
        now = HostStepRun(loaded, rows=3, context=20, steps=4)
    # The old engine is built from the old revision's files throughout.
    for part, module in ((then.engine, "engine"), (then.engine.scheduler, "scheduler"),
                         (then.engine.scheduler.blocks, "block_manager"),
                         (then.engine.scheduler.blocks.prefix_cache, "prefix_cache"),
                         (then.engine.runner, "model_runner"),
                         (then.engine.runner.input_batch, "input_batch"), (then.engine.runner.sampler, "sampler")):
        assert type(part).__module__ == f"_old_{module}"
    assert all(type(t.request).__module__ == "_old_request" for t in then.engine._tracked.values())
    assert old["model_runner"].DecodeGraphs is old["model.decode_graphs"].DecodeGraphs  # the old pieces too
    assert type(now.engine.runner.input_batch).__module__ == "balcony_runtime.input_batch"
    results = measure_interleaved([then, now], steps=4)
    assert len(then.cpu) == len(now.cpu) == 4  # one step of each in turn
    for r in results:
        assert (r.rows, r.context) == (3, 20)
        assert r.step_cpu_ms > 0 and set(r.phase_ms) >= {"schedule", "prepare", "sample", "postprocess"}
    # Same requests, same greedy stub: both versions produced the same tokens.
    tokens = [[t.request.output_token_ids for t in run.engine._tracked.values()] for run in (then, now)]
    assert tokens[0] == tokens[1]


def test_a_recycled_pool_serves_the_timed_rows_from_cached_prefixes(tiny_model_dir):
    """By default the timed rows find the pool as a running server leaves it, holding cached prompts
    that nobody holds, so the blocks they take evict cached ones; the pool's history changes no token."""
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    # Long enough a decode that the rows outgrow the blocks the wave left plain (the partial last
    # block of each of its prompts, and the layers its full-depth rows did not use).
    recycled = HostStepRun(loaded, rows=3, context=40, steps=60)
    fresh = HostStepRun(loaded, rows=3, context=40, steps=60, recycled=False)
    assert recycled.engine.blocks._evictable
    assert fresh.engine.blocks._num_free and not fresh.engine.blocks._evictable
    evicted: list[int] = []
    for run in (recycled, fresh):
        cache = run.engine.blocks.prefix_cache
        forget = cache.forget
        cache.forget = lambda blocks, forget=forget: (evicted.extend(blocks), forget(blocks))
    measure_interleaved([recycled, fresh], steps=60)
    assert evicted and set(evicted) <= set(range(recycled.engine.blocks.num_blocks))
    tokens = [[t.request.output_token_ids for t in run.engine._tracked.values()] for run in (recycled, fresh)]
    assert tokens[0] == tokens[1]


def test_queued_requests_wait_behind_the_full_batch_and_change_no_token(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    queued = HostStepRun(loaded, rows=3, context=20, steps=6, queued=5)
    alone = HostStepRun(loaded, rows=3, context=20, steps=6)
    measure_interleaved([queued, alone], steps=6)
    assert queued.engine.num_waiting == 5 and queued.engine.num_running == 3
    rows = [[t.request.output_token_ids for t in run.engine._tracked.values()][:3] for run in (queued, alone)]
    assert rows[0] == rows[1] and all(len(r) == len(rows[0][0]) for r in rows[0])


def test_the_step_is_timed_without_the_phase_timers_and_the_phases_in_a_step_of_their_own(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    run = HostStepRun(loaded, rows=3, context=20, steps=5)
    engine = run.engine
    seen = []  # for each engine step: was the scheduler's schedule the class's own (no timer over it)?
    step = engine.step
    engine.step = lambda: (seen.append("schedule" not in vars(engine.scheduler)), step())[1]
    measure_interleaved([run], steps=5)
    del engine.step
    assert seen == [True, False] * 5  # each timed step whole and bare, then one with the timers
    assert len(run.cpu) == 5 and all(len(run.phases[p]) == 5 for p in ("schedule", "prepare", "postprocess"))
    # The timers are off again: every method is the class's.
    for owner, name in ((engine.scheduler, "schedule"), (engine.runner, "prepare"), (engine, "_postprocess"),
                        (engine.runner.sampler, "sample_on_device")):
        assert name not in vars(owner)
    assert not hasattr(engine.runner.model, "_call")
    # Every row decoded two tokens per timed step and none finished early.
    assert engine.num_running == 3


def test_a_run_steps_under_its_own_collector_threshold_and_puts_the_serving_one_back(tiny_model_dir):
    import gc

    from balcony_runtime.heap import YOUNG_THRESHOLD

    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    default, serving = HostStepRun(loaded, rows=3, context=20, steps=3, young_threshold=700), \
        HostStepRun(loaded, rows=3, context=20, steps=3)
    seen = {}
    for run, name in ((default, "default"), (serving, "serving")):
        step = run.engine.step
        run.engine.step = lambda step=step, name=name: (seen.setdefault(name, set()).add(gc.get_threshold()[0]), step())[1]
    before = gc.get_threshold()
    measure_interleaved([default, serving], steps=3)
    assert seen == {"default": {700}, "serving": {YOUNG_THRESHOLD}}
    assert gc.get_threshold() == before


def test_through_decode_graphs_every_decode_step_replays_and_no_token_changes(tiny_model_dir):
    """--graphs: decode steps go through the decode graphs' host path (which rows leave where, the
    bucket, the static buffers) with every replay a no-op, and the forward phase times it; the
    logits the replays would leave are the stub's, so the tokens are the eager stub's."""
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    graphed = HostStepRun(loaded, rows=3, context=20, steps=6, graphs=True)
    eager = HostStepRun(loaded, rows=3, context=20, steps=6)
    graphs = graphed.engine.runner.graphs
    replays = []
    graphs._pieces = {key: (lambda key=key: replays.append(key)) for key in graphs._pieces}
    called = []
    stub = graphed.engine.runner.model
    forward = stub.forward
    stub.forward = lambda *args: called.append(1) or forward(*args)
    measure_interleaved([graphed, eager], steps=6)
    # Every decode step (two per timed step) replayed, each its head once at the bucket of 3 rows;
    # none ran the model eagerly.
    assert [key for key in replays if key[0] == "head"] == [("head", 0, 3)] * 12 and not called
    assert ("segment", 0, 3) in replays
    assert len(graphed.phases["forward"]) == 6 and all(t > 0 for t in graphed.phases["forward"])
    tokens = [[t.request.output_token_ids for t in r.engine._tracked.values()] for r in (graphed, eager)]
    assert tokens[0] == tokens[1]


def test_rows_take_the_given_exits_in_turn(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    depths = every_depth(loaded)
    run = HostStepRun(loaded, rows=5, context=20, steps=3, exit_layer=depths)
    measure_interleaved([run], steps=3)
    exits = [t.request.exit_layer for t in run.engine._tracked.values()][-5:]
    assert sorted(exits) == sorted(depths[i % len(depths)] for i in range(5)) and len(set(exits)) == min(5, len(depths))


def test_a_simulated_device_paces_steps_on_its_own_timeline(monkeypatch):
    """A step starts when it is launched or when the one before it ends, whichever is later; its
    pace is the time between consecutive ends, however late the host reads it."""
    from balcony_runtime import host_step_benchmark

    clock = iter([10.000, 10.001, 10.020, 10.021])  # launches: two queued at once, one after an idle gap, one queued
    monkeypatch.setattr(host_step_benchmark, "time", SimpleNamespace(perf_counter=lambda: next(clock)))

    class Runner:
        def sample(self):
            return "pending"

    device, runner = host_step_benchmark.SimulatedDevice(5.0), Runner()
    device.wrap(runner)
    for _ in range(4):
        runner.sample()
    assert device.ends == pytest.approx([10.005, 10.010, 10.025, 10.030])
    assert device.paces(0) == pytest.approx([0.005, 0.015, 0.005])  # the idle gap shows as a slower step
    assert device.paces(2) == pytest.approx([0.015, 0.005])
