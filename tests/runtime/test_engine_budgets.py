"""Budgets in the engine: routing, deadlines, depth-limited steps and hit/miss accounting (tiny model)."""

from __future__ import annotations

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.request_output import RequestOutput
from balcony_runtime.errors import RequestError
from balcony_runtime.routing.router import BudgetUnmeetable
from balcony_runtime.routing.step_cost import StepCostModel
from balcony_runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, max_num_seqs=16))
    engine.calibrate(batch=4, steps=2, prompt_tokens=24, burst=8)
    return engine


def test_budgets_need_a_calibrated_engine(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=256))
    with pytest.raises(RequestError, match="calibrated"):
        engine.add_request([5, 6, 7], GREEDY, budget_ms=100)
    engine.add_request([5, 6, 7], GREEDY)  # no budget: full depth, no router needed


@pytest.mark.parametrize("bad", [0, -5.0, float("nan")])
def test_a_budget_must_be_positive(engine, bad):
    with pytest.raises(RequestError, match="positive"):
        engine.add_request([5, 6, 7], GREEDY, budget_ms=bad)


def test_a_generous_budget_is_full_depth_and_a_hit(engine):
    (done,) = engine.generate([[5, 6, 7, 8]], GREEDY, budget_ms=60_000)
    assert done.exit_layer == engine.model.full_depth
    assert done.route.budget_ms == 60_000 and done.route.predicted_fit and not done.route.forced
    assert done.budget_met is True and 0 < done.latency_s < 60
    (plain,) = engine.generate([[5, 6, 7, 8]], GREEDY)
    assert plain.budget_met is None and plain.route.budget_ms is None


def test_an_impossible_budget_is_the_shallowest_exit_and_a_miss(engine):
    (done,) = engine.generate([[5, 6, 7, 8]], GREEDY, budget_ms=1e-3)
    assert done.exit_layer == engine.exits[0] and done.route.predicted_fit is False
    assert done.budget_met is False


def test_reject_policy_raises_and_queues_nothing(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, budget_policy="reject"))
    engine.calibrate(batch=2, steps=2, prompt_tokens=24, burst=2)
    with pytest.raises(BudgetUnmeetable):
        engine.add_request([5, 6, 7], GREEDY, budget_ms=1e-3)
    assert not engine.has_unfinished()


def test_served_exits_limit_routing_and_forcing(tiny_model):
    full = tiny_model.model.full_depth
    with pytest.raises(ValueError, match=r"exits \[7\] are not in this model"):
        LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, served_exits=(2, 7)))
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, served_exits=(2, full)))
    assert engine.exits == (2, full) and engine.exit_names() == ["2", "full"]
    engine.calibrate(batch=2, steps=2, prompt_tokens=24, burst=2)
    (done,) = engine.generate([[5, 6, 7]], GREEDY, budget_ms=1e-3)
    assert done.exit_layer == 2  # exit 1 is in the model but not served
    with pytest.raises(RequestError, match="serves exits 2, full"):
        engine.add_request([5, 6, 7], GREEDY, exit_layer=1)
    shallow = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, served_exits=(1, 2)))
    (plain,) = shallow.generate([[5, 6, 7]], GREEDY)
    assert plain.exit_layer == 2  # no budget, no exit: the deepest served
    with pytest.raises(RequestError, match="serves exits 1, 2"):
        shallow.add_request([5, 6, 7], GREEDY, exit_layer="full")


def test_depth_limited_steps_run_and_change_no_token(engine):
    """An urgent shallow request next to deep ones gets steps of its own; every request's greedy
    tokens are those it gets alone, whichever steps it rode."""
    prompts = [[5 + i, 9, 13, 2 + i] for i in range(4)]
    deep_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone = [engine.generate([p], deep_params, exit_layer="full")[0].token_ids for p in prompts[:3]]
    shallow_alone = engine.generate([prompts[3]], GREEDY, exit_layer=1)[0].token_ids

    # The scheduler judges urgency on a step-cost model of its own, here one second per layer run:
    # a full step of these rows (4 backbone layers + balcony 1) 5 s, an exit-1 step 2 s. With 40 s
    # for 12 tokens the shallow request misses on full steps (60 s) and makes it alone (24 s),
    # whatever this machine's real step times are.
    measured = engine.scheduler.step_cost
    engine.scheduler.step_cost = StepCostModel(engine.model.full_depth, coefficients=(0.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    try:
        deep_ids = [engine.add_request(p, deep_params, exit_layer="full") for p in prompts[:3]]
        tokens: dict[str, list[int]] = {rid: [] for rid in deep_ids}
        for out in engine.step():  # their prefill
            tokens[out.request_id] += out.new_token_ids
        tight = engine.add_request(prompts[3], GREEDY, exit_layer=1, budget_ms=40_000)
        tokens[tight] = []
        limits = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            limits.append(engine.last_step.depth_limit)
    finally:
        engine.scheduler.step_cost = measured
    # Steps that ran the exit-1 row only, while it was behind its schedule (once ahead of it, it
    # rides full steps again until it falls behind), and full steps for the deep rows.
    assert 1 in limits and None in limits
    assert [tokens[rid] for rid in deep_ids] == alone
    assert tokens[tight] == shallow_alone


def test_rows_for_another_process_rebuild_the_outputs_and_carry_the_route_once(tiny_model):
    """emit_rows (the engine's process): each output a tuple of RequestOutput's fields that rebuilds
    the object the engine gives otherwise; the route, with its budget, on the final output only."""
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, max_num_seqs=16))  # (emit_rows is for good)
    engine.calibrate(batch=4, steps=2, prompt_tokens=24, burst=8)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]

    def run() -> list:
        for p in prompts:
            engine.add_request(p, GREEDY, budget_ms=60_000)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        return outputs

    objects = run()
    engine.emit_rows()
    rows = run()
    assert all(type(row) is tuple for row in rows)
    rebuilt = [RequestOutput(*row) for row in rows]
    timing = {"request_id", "arrival_time", "first_scheduled_time", "first_token_time", "latency_s", "route",
              "num_cached_tokens"}  # (the second run reads the first's prompts from the prefix cache)

    def comparable(out: RequestOutput) -> tuple:
        return tuple(getattr(out, f) for f in RequestOutput.__slots__ if f not in timing)

    assert [comparable(o) for o in rebuilt] == [comparable(o) for o in objects]
    for outs in (objects, rebuilt):
        assert all((o.route is not None) == o.finished for o in outs)
        assert {o.route.budget_ms for o in outs if o.finished} == {60_000}
