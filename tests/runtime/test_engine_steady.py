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
        plans.append([(i.request.exit_layer, i.request.request_id, i.start, i.num_tokens) for i in out.scheduled])
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
    # The same rows in every plan, deepest exit first; within an exit the steady plans list the rows
    # as the runner's batch holds them (Scheduler.follow_batch_order), the row-by-row ones as admitted.
    assert [[row[0] for row in plan] for plan in plans] == [[row[0] for row in plan] for plan in plans_ref]
    assert [sorted(plan) for plan in plans] == [sorted(plan) for plan in plans_ref]
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


@pytest.mark.parametrize("overlap", [False, True])
def test_a_steady_decode_lists_its_rows_as_the_batch_holds_them(tiny_model, overlap):
    """A request that leaves from the front moves the last row into its slot, so the batch holds
    the rest in another order than admission's; the steady decode that follows lists its rows in the
    batch's order, and every plan after its first is prepared from the runner's kept lists."""
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=8, overlap_steps=overlap))
    plans, kept_flags = [], {}  # kept_flags: plan index -> prepared from the kept lists
    schedule, prepare = engine.scheduler.schedule, engine.runner.prepare

    def recorded(now):
        plans.append(schedule(now))
        return plans[-1]

    def counted(scheduled, previous=None, run=None):
        kept = engine.runner._run_lists
        kept_flags[len(plans) - 1] = run is not None and kept is not None and kept.requests is run.requests
        return prepare(scheduled, previous, run)

    engine.scheduler.schedule, engine.runner.prepare = recorded, counted
    ids = [engine.add_request([5 + i, 6, 7], SamplingParams(max_tokens=3 if i == 0 else 24, temperature=0,
                                                            ignore_eos=True), exit_layer=exit_layer)
           for i, exit_layer in enumerate(["full", "full", "full", 2, 2])]
    texts = {}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
    after = [i for i, p in enumerate(plans) if ids[0] not in {item.request.request_id for item in p.scheduled}]
    # The steady decode's first plan is prepared from its rows; every later one from the kept lists.
    first = next(i for i in after if plans[i].decode_run is not None)
    late = [i for i in after if i > first and plans[i].decode_run is not None]
    assert len(late) > 15 and all(kept_flags[i] for i in late)
    # The rows are listed as the batch holds them: the last full-depth row took the first one's slot.
    assert [item.request.request_id for item in plans[late[0]].scheduled][:2] == [ids[2], ids[1]]
    # And the text is what each request makes alone.
    for rid, exit_layer, i in zip(ids[1:], ["full", "full", 2, 2], range(1, 5)):
        alone = LLMEngine(tiny_model, EngineConfig(max_num_seqs=1))
        own = alone.add_request([5 + i, 6, 7], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                exit_layer=exit_layer)
        text = ""
        while alone.has_unfinished():
            text += "".join(o.new_text for o in alone.step() if o.request_id == own)
        assert texts[rid] == text
