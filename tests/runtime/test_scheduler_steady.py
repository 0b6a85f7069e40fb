"""The steady-decode plan (Scheduler._schedule_steady, array operations over the last plan's rows)
against the row-by-row pass it stands in for: twin schedulers on twin pools, one planning every step
row by row, given the same arrivals, finishes, aborts and preemptions, make the same plans and leave
the same block tables. No torch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request, RequestStatus
from balcony_runtime.routing.step_cost import RowShape, StepCostModel
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

FULL = 30
EXITS = (8, 15, 22, FULL)


def _cost() -> StepCostModel:
    return StepCostModel(FULL, coefficients=(0.001, 0.002, 0.0001, 0.00001, 0.005, 0.0))


def _request(rid: str, exit_layer: int, prompt: list[int], max_tokens: int, now: float,
             deadline: float | None) -> Request:
    layers = FULL if exit_layer == FULL else exit_layer + 1
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), exit_layer, layers,
                   now, deadline=deadline, cache_layers=tuple(range(layers)))


def _plan(out: SchedulerOutput) -> list:
    return ([(i.request.request_id, i.start, i.num_tokens, i.completes_sequence) for i in out.scheduled],
            [r.request_id for r in out.preempted], out.depth_limit)


@pytest.mark.parametrize("seed, deadlines", [(0, False), (1, False), (2, True), (3, True)])
def test_steady_plans_are_the_plans_of_the_row_by_row_pass(seed, deadlines):
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=48)
    twins = [Scheduler(config, BlockManager(700, 4, prefix_caching=True), _cost()) for _ in range(2)]
    twins[1].steady_decodes = False
    requests: list[dict[str, Request]] = [{}, {}]
    heads = [[rng.randrange(1, 50) for _ in range(rng.randint(4, 20))] for _ in range(3)]  # shared prompt heads
    now, steady_steps = 0.0, 0
    for step in range(2000):
        # Arrivals come in bursts with quiet stretches between, so steady decodes run for a while.
        if rng.random() < (0.5 if step % 200 < 20 else 0.01):
            prompt = rng.choice(heads) + [rng.randrange(1, 50) for _ in range(rng.randint(1, 40))]
            exit_layer, max_tokens = rng.choice(EXITS), rng.randint(1, 120)
            deadline = now + rng.uniform(0.05, 3.0) if deadlines and rng.random() < 0.3 else None
            for s, known in zip(twins, requests):
                known[f"r{step}"] = r = _request(f"r{step}", exit_layer, prompt, max_tokens, now, deadline)
                s.add(r)
        if rng.random() < 0.01 and twins[0].running:  # an abort
            rid = rng.choice(twins[0].running).request_id
            for s, known in zip(twins, requests):
                s.finish(known[rid], "abort")
        outs = [s.schedule(now) for s in twins]
        assert _plan(outs[0]) == _plan(outs[1])
        assert outs[1].decode_run is None
        if outs[0].decode_run is not None:
            steady_steps += 1
            assert outs[0].decode_run.starts.tolist() == [i.start for i in outs[0].scheduled]
        seconds = _cost().step_seconds([RowShape(i.request.exit_layer, i.num_tokens, i.start) for i in outs[0].scheduled])
        sampled = {i.request.request_id: rng.randrange(1, 50) for i in outs[0].scheduled if i.completes_sequence}
        for s, out in zip(twins, outs):
            s.on_step_done(out, seconds)
            for item in out.scheduled:
                r = item.request
                if item.completes_sequence:
                    r.output_token_ids.append(sampled[r.request_id])  # the same token in both twins
                    if len(r.output_token_ids) >= r.params.max_tokens:
                        s.finish(r, "length")
        now += seconds
        states = [[(r.request_id, r.num_computed_tokens, r.status, r.waited_s, s.blocks.block_tables(r.request_id))
                   for r in s.running] for s in twins]
        assert states[0] == states[1]
        assert [r.request_id for r in twins[0].waiting] == [r.request_id for r in twins[1].waiting]
    finished = sum(r.status is RequestStatus.FINISHED for r in requests[0].values())
    preempted = sum(r.num_preemptions for r in requests[0].values())
    # The workload exercised what it should: many steady plans, some ended by finishes, arrivals and
    # preemptions (a pool of 700 blocks of 4 tokens is tight for 12 rows of up to 180 tokens).
    assert steady_steps > 200 and finished > 10 and preempted > 0


def test_a_steady_plans_rows_are_made_when_read_and_are_the_rows_it_plans():
    blocks = BlockManager(4000, 16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256), blocks)
    for i, exit_layer in enumerate((FULL, 22, 8)):
        scheduler.add(_request(f"r{i}", exit_layer, list(range(5 + 7 * i)), 50, 0.0, None))
    outs = []
    for _ in range(6):
        out = scheduler.schedule(0.0)
        scheduler.on_step_launched(out)
        for item in out.scheduled if out.decode_run is None else ():
            item.request.output_token_ids.append(7)
        if out.decode_run is not None:
            for request in out.decode_run.requests:
                request.output_token_ids.append(7)
        outs.append(out)
    steady = [out for out in outs if out.decode_run is not None]
    assert len(steady) >= 4
    out = steady[-1]
    rows = out.scheduled
    assert rows._items is None  # nothing read it yet
    assert len(rows) == 3 and bool(rows)
    one = rows[1]  # a row read by index alone, before any iteration
    assert (one.request.request_id, one.start, one.num_tokens, one.completes_sequence) == \
        ("r1", int(out.decode_run.starts[1]), 1, True)
    assert rows._items is None
    made = list(rows)
    assert [i.request for i in made] == out.decode_run.requests
    assert [i.start for i in made] == out.decode_run.starts.tolist()
    assert [r.num_computed_tokens - 1 for r in out.decode_run.requests] == [i.start for i in made]
    assert rows[0] is made[0] and rows[-1] is made[-1] and rows[1:] == made[1:]  # now the same objects
    assert list(rows) == made


@pytest.mark.parametrize("one_exit", [True, False], ids=["one-exit", "mixed-exits"])
def test_a_steady_plan_names_the_rows_that_took_blocks_and_the_blocks(one_exit):
    """DecodeRun.grown: the rows whose context crosses into a new block this plan and the block each
    took at every cache layer of its exit, as the block manager's tables show them: [G, L] for rows
    of one exit, each row's in turn for rows of several."""
    blocks = BlockManager(4000, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256), blocks)
    exits = [22] * 6 if one_exit else [FULL, 22, 22, 8, 8, 8]
    for i, exit_layer in enumerate(exits):
        scheduler.add(_request(f"r{i}", exit_layer, list(range(3 + i)), 60, 0.0, None))
    grown_plans = 0
    for _ in range(40):
        before = {r.request_id: blocks.block_tables(r.request_id) for r in scheduler.running}
        out = scheduler.schedule(0.0)
        scheduler.on_step_launched(out)
        run = out.decode_run
        if run is not None and before:
            grown = run.grown
            assert grown is not None and grown.exit_layer == (22 if one_exit else None)
            crossed = [b for b, start in enumerate(run.starts.tolist()) if start % 4 == 0]
            assert sorted(grown.rows.tolist()) == crossed
            rows = grown.rows.tolist()
            if one_exit:
                per_row = grown.ids.tolist()
            else:  # each row's ids in turn, as many as its exit's cache layers
                assert list(grown.row_exits) == [run.requests[b].exit_layer for b in rows]
                sizes = [run.requests[b].num_cache_layers for b in rows]
                assert len(grown.ids) == sum(sizes)
                per_row = [part.tolist() for part in np.split(grown.ids, np.cumsum(sizes)[:-1])] if rows else []
            for b, ids in zip(rows, per_row):
                rid = run.requests[b].request_id
                after = blocks.block_tables(rid)
                assert [len(t) for t in after] == [len(t) + 1 for t in before[rid]]
                assert ids == [t[-1] for t in after]
            grown_plans += len(rows) > 0
        for item in out.scheduled:
            item.request.output_token_ids.append(7)
    assert grown_plans >= 5
