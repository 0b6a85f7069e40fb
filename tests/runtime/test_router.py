"""The latency model and the budget router on hand-made costs: no model, no timing."""

from __future__ import annotations

import pytest

from balcony_runtime.latency_model import ExitCost, LatencyModel, LoadSnapshot, prompt_pairs
from balcony_runtime.router import BudgetUnmeetable, Router

EXITS = (8, 15, 22, 30)


def model() -> LatencyModel:
    # Decode steps of 10/16/22/28 ms at one row, +1 ms a row; prefill 0.1 ms a token at every exit.
    return LatencyModel({e: ExitCost(0.004 + 0.0008 * e, 0.001, 0.0001) for e in EXITS})


IDLE = LoadSnapshot(running_exits=(), num_waiting=0, mean_remaining_tokens=0.0, max_num_seqs=8)


def test_prediction_adds_queue_prefill_and_decode():
    m = model()
    # Idle: half a step of the shallowest exit waiting, 100 prompt tokens, 10 decode steps.
    expected = m.decode_step(8, 0) / 2 + 100 * 0.0001 + 10 * m.decode_step(22, 1)
    assert m.predict(22, 100, 10, IDLE) == pytest.approx(expected)


def test_a_deeper_running_request_sets_the_step_time():
    m = model()
    busy = LoadSnapshot(running_exits=(30, 30), num_waiting=0, mean_remaining_tokens=50, max_num_seqs=8)
    # At exit 8 next to full-depth rows, every step is a full-depth step with three rows.
    assert m.predict(8, 10, 20, busy) == pytest.approx(
        m.decode_step(30, 2) / 2 + 10 * 0.0001 + 20 * m.decode_step(30, 3))


def test_router_picks_the_deepest_exit_that_fits():
    router = Router(model(), EXITS)
    predicted = {e: 1000 * router.model.predict(e, 20, 50, IDLE) for e in EXITS}
    assert predicted[8] < predicted[15] < predicted[22] < predicted[30]
    for e in EXITS:
        decision = router.route(predicted[e] + 0.01, 20, 50, IDLE)
        assert decision.exit_layer == e and decision.predicted_fit
    assert router.route(None, 20, 50, IDLE).exit_layer == 30  # no budget: full depth
    assert router.route(1e9, 20, 50, IDLE).exit_layer == 30


def test_unmeetable_budget_best_effort_or_reject():
    best_effort = Router(model(), EXITS).route(1.0, 20, 50, IDLE)
    assert best_effort.exit_layer == 8 and best_effort.predicted_fit is False
    with pytest.raises(BudgetUnmeetable, match="no exit can meet"):
        Router(model(), EXITS, policy="reject").route(1.0, 20, 50, IDLE)


def test_forced_exit_is_kept_and_judged():
    decision = Router(model(), EXITS).route(1.0, 20, 50, IDLE, forced_exit=22)
    assert decision.exit_layer == 22 and decision.forced and decision.predicted_fit is False


def test_online_correction_moves_toward_measured_steps():
    m = model()
    before = m.decode_step(30, 4)
    for _ in range(50):
        m.observe(2 * before, deepest_exit=30, num_rows=4, num_prefill_tokens=0)
    assert m.decode_step(30, 4) == pytest.approx(2 * before, rel=0.02)
    # Other exits follow the drift at half weight: up, but less than the exit that was measured.
    assert model().decode_step(8, 4) < m.decode_step(8, 4) < 2 * model().decode_step(8, 4)
    settled = m.decode_step(30, 4)
    m.observe(100.0, deepest_exit=30, num_rows=4, num_prefill_tokens=0)  # one outlier: a bounded step
    assert m.decode_step(30, 4) <= settled * (1 + m.smoothing * 3) * 1.0001  # ratio clamped at 4


def test_queue_wait_grows_with_the_queue():
    m = model()
    full = LoadSnapshot(running_exits=(30,) * 8, num_waiting=0, mean_remaining_tokens=40, max_num_seqs=8)
    longer = LoadSnapshot(running_exits=(30,) * 8, num_waiting=16, mean_remaining_tokens=40, max_num_seqs=8)
    assert m.queue_wait(IDLE) < m.queue_wait(full) < m.queue_wait(longer)


def test_end_to_end_factor_learns_from_finished_requests():
    router = Router(model(), EXITS)
    budget = 1000 * router.model.predict(30, 20, 50, IDLE) * 1.05  # full depth fits, just
    assert router.route(budget, 20, 50, IDLE).exit_layer == 30
    for _ in range(20):  # requests keep taking 30% longer than predicted
        router.model.observe_request(1.0, 1.3, rows=1)
    assert router.model.e2e_factor(1) == pytest.approx(1.3)
    decision = router.route(budget, 20, 50, IDLE)
    assert decision.exit_layer < 30 and decision.predicted_ms == pytest.approx(1.3 * decision.model_ms)
    assert decision.batch_rows == 1
    for _ in range(300):  # faster than predicted: the factor never goes below 1
        router.model.observe_request(1.0, 0.5, rows=1)
    assert router.model.e2e_factor(1) == 1.0


def test_factor_is_learnt_per_admission_batch_class():
    m = model()
    # Requests admitted alone are slowed by later arrivals (x2.5); those admitted into a batch of 12 are not.
    for _ in range(20):
        m.observe_request(1.0, 2.5, rows=1)
        m.observe_request(1.0, 1.1, rows=12)
    assert m.e2e_factor(1) == pytest.approx(2.5)
    assert m.e2e_factor(12) == pytest.approx(1.1) == m.e2e_factor(9)  # 8-15 share a class
    # A class with too few requests of its own uses every class pooled.
    assert m.e2e_factor(40) == pytest.approx(2.5)
    busy = LoadSnapshot(running_exits=(30,) * 11, num_waiting=0, mean_remaining_tokens=5, max_num_seqs=16)
    decision = Router(m, EXITS).route(None, 10, 20, busy)
    assert decision.batch_rows == 12 and decision.predicted_ms == pytest.approx(1.1 * decision.model_ms)


def test_prompts_queued_ahead_delay_the_prediction_by_their_prefill():
    m = model()
    ahead = LoadSnapshot(running_exits=(), num_waiting=2, mean_remaining_tokens=0.0, max_num_seqs=8,
                         waiting_exits=(30, 30), pending_prefill_tokens=400)
    alone = LoadSnapshot(running_exits=(), num_waiting=2, mean_remaining_tokens=0.0, max_num_seqs=8,
                         waiting_exits=(30, 30))
    assert m.predict(8, 10, 20, ahead) - m.predict(8, 10, 20, alone) == pytest.approx(400 * 0.0001)


def test_prompt_pairs_count_causal_attention():
    # 3 new tokens after 2 cached: they see 3, 4 and 5 keys.
    assert prompt_pairs(3, cached=2) == 3 + 4 + 5
    assert prompt_pairs(4) == 1 + 2 + 3 + 4
    assert prompt_pairs(0, cached=9) == 0


def test_attention_terms_grow_prefill_quadratically_and_decode_with_context():
    m = LatencyModel({e: ExitCost(0.01, 0.001, 0.0001, prefill_per_pair_s=1e-8, decode_per_context_s=1e-6)
                      for e in EXITS})
    flat = model()
    for tokens in (100, 4000):  # the same model without attention terms, plus exactly those terms
        extra = m.predict(30, tokens, 10, IDLE) - LatencyModel(
            {e: ExitCost(0.01, 0.001, 0.0001) for e in EXITS}).predict(30, tokens, 10, IDLE)
        assert extra == pytest.approx(1e-8 * prompt_pairs(tokens) + 10 * 1e-6 * (tokens + 5))
    assert m.prefill(30, 4000) / m.prefill(30, 1000) > 4.5  # superlinear, unlike flat's 4x
    assert flat.prefill(30, 4000) / flat.prefill(30, 1000) == pytest.approx(4)
    # Requests already decoding at long context slow every step a newcomer shares.
    crowded = LoadSnapshot(running_exits=(30, 30), num_waiting=0, mean_remaining_tokens=5, max_num_seqs=8,
                           context_tokens=6000)
    short = LoadSnapshot(running_exits=(30, 30), num_waiting=0, mean_remaining_tokens=5, max_num_seqs=8,
                         context_tokens=60)
    assert m.predict(30, 10, 20, crowded) - m.predict(30, 10, 20, short) == pytest.approx(
        (20 + 0.5) * 1e-6 * 5940)  # 20 decode steps plus the half step of queue wait


def test_online_correction_scales_the_attention_terms_with_their_kind_of_step():
    m = LatencyModel({e: ExitCost(0.01, 0.001, 0.0001, prefill_per_pair_s=1e-8, decode_per_context_s=1e-6)
                      for e in EXITS})
    pairs = prompt_pairs(512, cached=1024)  # a second chunk of a long prompt
    prefill_step = m.decode_step(30, 1) + 2 * m.prefill(30, 512, pairs)  # its prefill twice as slow
    decode_step = m.decode_step(30, 4, 4000)  # decode steps as predicted
    for _ in range(200):
        m.observe(prefill_step, 30, 1, 512, pairs, 0)
        m.observe(decode_step, 30, 4, 0, 0, 4000)
    assert m.costs[30].prefill_per_pair_s == pytest.approx(2e-8, rel=0.02)
    assert m.costs[30].prefill_per_token_s == pytest.approx(2e-4, rel=0.02)
    assert m.costs[30].decode_per_context_s == pytest.approx(1e-6, rel=0.02)
