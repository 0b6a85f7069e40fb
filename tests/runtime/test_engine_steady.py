"""Steady decodes planned from arrays (Scheduler.steady_decodes) and prepared from the runner's kept
lists (ModelRunner.prepare with a DecodeRun) through the whole engine, with synchronous and
overlapped steps: the same plans, tokens and texts as an engine whose scheduler plans every step
row by row, under arrivals, stops, aborts and a pool tight enough to preempt."""

from __future__ import annotations

import random

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.sampling_params import SamplingParams


def _drive(model, steady: bool, overlap: bool, seed: int):
    rng = random.Random(seed)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=90 * len(model.model.cache_layers_of(model.model.full_depth)) // 4,
                                           max_num_seqs=6, max_num_batched_tokens=64, overlap_steps=overlap))
    engine.scheduler.steady_decodes = steady
    plans, steady_plans = [], 0
    schedule = engine.scheduler.schedule

    def recorded(now):
        nonlocal steady_plans
        out = schedule(now)
        plans.append([(i.request.request_id, i.start, i.num_tokens) for i in out.scheduled])
        steady_plans += out.decode_run is not None
        return out

    engine.scheduler.schedule = recorded
    prepare, kept_lists = engine.runner.prepare, 0

    def counted(scheduled, previous=None, run=None):
        nonlocal kept_lists
        kept = engine.runner._run_lists
        kept_lists += run is not None and kept is not None and kept.requests is run.requests
        return prepare(scheduled, previous, run)

    engine.runner.prepare = counted
    texts: dict[str, list] = {}
    for step in range(260):
        if rng.random() < (0.6 if step % 60 < 6 else 0.02):
            stop = [rng.randrange(300)] if rng.random() < 0.3 else []  # a stop token, sometimes met
            params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, stop_token_ids=stop,
                                    ignore_eos=True)
            prompt = [rng.randrange(5, 300) for _ in range(rng.randint(2, 30))]
            engine.add_request(prompt, params, exit_layer=rng.choice([2, "full", None]), request_id=f"r{step}")
        if rng.random() < 0.01 and engine._tracked:
            engine.abort(rng.choice(sorted(engine._tracked)))
        for out in engine.step():
            texts.setdefault(out.request_id, []).append((out.new_token_ids, out.new_text, out.finish_reason))
    while engine.has_unfinished():
        for out in engine.step():
            texts.setdefault(out.request_id, []).append((out.new_token_ids, out.new_text, out.finish_reason))
    assert engine.blocks.num_used_blocks == 0
    return plans, texts, steady_plans, kept_lists


@pytest.mark.parametrize("overlap", [False, True])
def test_steady_decodes_plan_and_generate_what_row_by_row_planning_does(tiny_model, overlap):
    (plans, texts, steady, kept), (plans_ref, texts_ref, none, none_kept) = (
        _drive(tiny_model, steady, overlap, seed=7) for steady in (True, False))
    assert none == 0 and steady > 100  # the arrays planned most quiet stretches
    assert none_kept == 0 and kept > 80  # and the runner prepared most of them from its kept lists
    assert plans == plans_ref
    assert texts == texts_ref


@pytest.mark.parametrize("overlap", [False, True])
def test_a_steady_step_of_plain_requests_makes_no_row_objects(tiny_model, overlap):
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=4, overlap_steps=overlap))
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda now: plans.append(schedule(now)) or plans[-1]
    for i in range(4):
        engine.add_request([5 + i, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                           exit_layer=(2, "full")[i % 2])
    while engine.has_unfinished():
        engine.step()
    steady = [p for p in plans if p.decode_run is not None]
    assert len(steady) > 10
    # The step took the rows' requests and starts from the plan's DecodeRun, except the first step
    # of a steady decode, which the runner prepares from the rows (and keeps lists for the rest).
    # (StepStats reads one row by index, which makes that one alone.)
    runs = {id(p.decode_run.requests) for p in steady}
    made = sum(p.scheduled._items is not None for p in steady)
    assert 0 < made <= len(runs) < len(steady) / 3, (made, len(runs), len(steady))
