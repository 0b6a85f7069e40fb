"""The scheduler on fake runner outputs: deadlines, depth-limited steps, starvation, preemption. No torch."""

from __future__ import annotations

import pytest

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request
from balcony_runtime.routing.step_cost import RowShape, StepCostModel
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

FULL = 30


def step_cost() -> StepCostModel:
    # 1 ms a step, 2 ms a layer run, 0.1 ms a row-layer, 5 ms a head row: weight reads dominate,
    # as on a CPU. A full step of 4 rows: 1 + 60 + 12 + 20 = 93 ms; exit 8 alone: 1 + 18 + 0.9 + 5.
    return StepCostModel(FULL, coefficients=(0.001, 0.002, 0.0001, 0.00001, 0.005, 0.0))


def request(rid: str, exit_layer: int, *, prompt: int = 4, max_tokens: int = 8, arrival: float = 0.0,
            deadline: float | None = None) -> Request:
    layers = FULL if exit_layer == FULL else exit_layer + 1
    return Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   exit_layer, layers, arrival, deadline=deadline)


def make(config: SchedulerConfig = SchedulerConfig(), blocks: int = 4096, cost: StepCostModel | None = None):
    return Scheduler(config, BlockManager(blocks, 4), cost if cost is not None else step_cost())


def run_step(s: Scheduler, now: float, cost: StepCostModel | None = None) -> tuple[SchedulerOutput, float]:
    """One step with fake runner outputs: each completing row samples a token; its predicted time passes."""
    out = s.schedule(now)
    seconds = (cost or step_cost()).step_seconds(
        [RowShape(i.request.exit_layer, i.num_tokens, i.start) for i in out.scheduled])
    s.on_step_done(out, seconds)
    for item in out.scheduled:
        r = item.request
        if item.completes_sequence:
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.params.max_tokens:
                s.finish(r, "length")
    return out, seconds


def ids(out: SchedulerOutput) -> list[str]:
    return [i.request.request_id for i in out.scheduled]


def test_rows_are_ordered_deepest_first_and_without_deadlines_every_row_runs():
    s = make()
    for rid, e in [("a", 8), ("b", FULL), ("c", 15)]:
        s.add(request(rid, e))
    out, _ = run_step(s, 0.0)
    assert ids(out) == ["b", "c", "a"] and out.depth_limit is None
    out, _ = run_step(s, 0.1)
    assert ids(out) == ["b", "c", "a"] and out.depth_limit is None


def test_admission_is_earliest_deadline_first_and_unbudgeted_count_as_due_after_the_horizon():
    s = make(SchedulerConfig(max_num_seqs=2, unbudgeted_horizon_s=5.0))
    s.add(request("none-early", FULL, arrival=0.0))  # due at 5.0
    s.add(request("late", FULL, arrival=0.1, deadline=9.0))
    s.add(request("soon", FULL, arrival=0.2, deadline=1.0))
    out, _ = run_step(s, 0.3)
    assert ids(out) == ["soon", "none-early"]  # two slots: the two earliest due
    assert [r.request_id for r in s.waiting] == ["late"]


def test_an_urgent_shallow_request_gets_depth_limited_steps():
    s = make()
    for i in range(3):
        s.add(request(f"deep{i}", FULL, max_tokens=100))
    # Exit 8 with 8 tokens and 0.3 s: full steps (about 0.1 s each) would take 0.8 s; alone, 0.03 s a token.
    s.add(request("tight", 8, max_tokens=8, deadline=0.3))
    out, seconds = run_step(s, 0.0)  # prefill of everyone: the tight row is not running yet
    now = seconds
    out, seconds = run_step(s, now)
    assert out.depth_limit == 8 and ids(out) == ["tight"]
    assert seconds < 0.04


def test_a_request_that_is_fine_on_full_steps_does_not_limit_depth():
    s = make()
    s.add(request("deep", FULL, max_tokens=100))
    s.add(request("relaxed", 8, max_tokens=8, deadline=60.0))
    run_step(s, 0.0)
    out, _ = run_step(s, 0.1)
    assert out.depth_limit is None and ids(out) == ["deep", "relaxed"]


def test_a_hopeless_request_does_not_limit_depth():
    s = make()
    s.add(request("deep", FULL, max_tokens=100))
    s.add(request("hopeless", 8, max_tokens=50, deadline=0.2))  # 50 tokens need > 1 s even alone
    run_step(s, 0.0)
    out, _ = run_step(s, 0.05)
    assert out.depth_limit is None


def test_depth_limit_covers_every_urgent_exit_and_the_rows_below_it():
    s = make()
    s.add(request("deep", FULL, max_tokens=100))
    s.add(request("mid", 15, max_tokens=4, deadline=0.25))
    s.add(request("shallow", 8, max_tokens=100))  # no deadline, but shallower than the limit
    run_step(s, 0.0)
    out, _ = run_step(s, 0.05)
    assert out.depth_limit == 15 and ids(out) == ["mid", "shallow"]


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_starvation_bound_a_skipped_row_waits_at_most_ratio_full_steps(ratio):
    cost = step_cost()
    s = make(SchedulerConfig(starvation_ratio=ratio), cost=cost)
    s.add(request("deep", FULL, max_tokens=1000))
    # A stream of tight shallow requests: one is always urgent.
    now, n = 0.0, 0
    full_step = cost.step_seconds([RowShape(FULL, 1, 10), RowShape(8, 1, 10)])
    waited = 0.0
    worst = 0.0
    for _ in range(300):
        if not any(r.exit_layer == 8 for r in s.running + s.waiting):
            s.add(request(f"tight{n}", 8, max_tokens=20, arrival=now, deadline=now + 0.7))
            n += 1
        out, seconds = run_step(s, now, cost)
        now += seconds
        if "deep" in ids(out):
            waited = 0.0
        else:
            waited += seconds
            worst = max(worst, waited)
    shallow_step = cost.step_seconds([RowShape(8, 1, 10)])
    assert worst > 0  # depth-limited steps did happen
    assert worst <= ratio * full_step + shallow_step + 1e-9
    deep = next(r for r in s.running if r.request_id == "deep")
    assert len(deep.output_token_ids) > 0


def test_preemption_takes_the_latest_due_and_does_not_readmit_it_in_the_same_step():
    # Room for 3 requests of 8 tokens at exit 8 (9 cache layers x 2 blocks of 4 tokens = 18 blocks each).
    s = make(SchedulerConfig(unbudgeted_horizon_s=100.0), blocks=3 * 18 + 2, cost=step_cost())
    s.add(request("a", 8, prompt=7, max_tokens=20, deadline=50.0))
    s.add(request("b", 8, prompt=7, max_tokens=20))  # no budget: due at 100
    s.add(request("c", 8, prompt=7, max_tokens=20, deadline=60.0))
    run_step(s, 0.0)  # prefill: 7 tokens in 2 blocks per layer, and a first token each
    run_step(s, 0.01)  # the 8th token still fits
    out, _ = run_step(s, 0.02)  # every row grows to a third block: one must go
    assert [r.request_id for r in out.preempted] == ["b"]
    assert "b" not in ids(out) and s.waiting[0].request_id == "b"
    assert s.waiting[0].num_computed_tokens == 0 and s.waiting[0].num_preemptions == 1


def test_no_step_cost_means_no_depth_limit():
    s = make(cost=None)
    s.step_cost = None
    s.add(request("deep", FULL, max_tokens=100))
    s.add(request("tight", 8, max_tokens=8, deadline=0.01))
    run_step(s, 0.0)
    out, _ = run_step(s, 0.001)
    assert out.depth_limit is None and len(out.scheduled) == 2
