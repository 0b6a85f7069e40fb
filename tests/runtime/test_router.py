"""The step-cost model, the latency model and the budget router on hand-made costs: no model, no timing."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from balcony_runtime.routing.latency_model import LatencyModel, LoadSnapshot, RowLoad
from balcony_runtime.routing.router import BudgetUnmeetable, Router
from balcony_runtime.routing.step_cost import RowShape, StepCostModel, StepShape, nnls

EXITS = (8, 15, 22, 30)
FULL = 30
COEFFICIENTS = (0.001, 0.002, 0.0001, 0.00002, 0.005, 1e-8)


def cost() -> StepCostModel:
    return StepCostModel(FULL, coefficients=COEFFICIENTS)


def idle(now: float = 0.0) -> LoadSnapshot:
    return LoadSnapshot(now=now, running=(), waiting=(), max_num_seqs=8, max_num_batched_tokens=512)


# ---- step cost ---------------------------------------------------------------------------------

def test_step_shape_counts_layers_once_and_rows_by_their_depth():
    shape = StepShape.of([RowShape(30, 1, 10), RowShape(8, 1, 5), RowShape(8, 1, 5), RowShape(15, 20, 0)], FULL)
    assert shape.layers == 30 + 2  # the backbone once, plus balconies 8 and 15
    assert shape.decode_token_layers == 30 + 9 + 9
    assert shape.prefill_token_layers == 20 * 16
    assert shape.head_rows == 4
    assert shape.attention_layers == 30 * 11 + 2 * 9 * 6 + 16 * (20 * 21 // 2)


def test_step_shape_of_random_steps_sums_each_row_as_the_docstring_says():
    # The shape is computed with numpy over columns; here it is summed row by row from the formulas.
    from balcony_runtime.routing.step_cost import attention_pairs, layers_run
    rng = random.Random(1)
    for _ in range(300):
        rows = [RowShape(rng.choice(EXITS + (29, 40)), rng.choice((1, 1, 1, 7, 300)), rng.randrange(5000),
                         rng.random() < 0.7) for _ in range(rng.randrange(12))]
        shape = StepShape.of(rows, FULL)
        assert shape.layers == (min(max(r.exit_layer for r in rows), FULL)
                                + len({r.exit_layer for r in rows if r.exit_layer < FULL}) if rows else 0)
        assert shape.decode_token_layers == sum(layers_run(r.exit_layer, FULL) for r in rows if r.num_tokens == 1)
        assert shape.prefill_token_layers == sum(layers_run(r.exit_layer, FULL) * r.num_tokens
                                                 for r in rows if r.num_tokens > 1)
        assert shape.head_rows == sum(r.samples for r in rows)
        assert shape.attention_layers == sum(layers_run(r.exit_layer, FULL) * attention_pairs(r.num_tokens, r.num_cached)
                                             for r in rows)
        assert all(type(v) is int for v in shape.features()[1:])

def test_nnls_matches_brute_force_over_a_grid_and_stays_non_negative():
    rng = np.random.default_rng(0)
    a = rng.random((40, 4))
    b = a @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.01 * rng.standard_normal(40)
    x = nnls(a, b)
    assert (x >= 0).all()
    # No non-negative point near it does better (a check independent of the solver's method).
    best = float(np.sum((a @ x - b) ** 2))
    for delta in itertools.product([-0.05, 0, 0.05], repeat=4):
        y = np.maximum(x + np.array(delta), 0)
        assert np.sum((a @ y - b) ** 2) >= best - 1e-12


def _nnls_by_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The same problem, one least-squares call per support on the scaled columns (a reference)."""
    n = a.shape[1]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    best, best_residual = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            residual = float(np.sum((a[:, cols] @ x - b) ** 2))
            if (x >= 0).all() and residual < best_residual:
                best, best_residual = np.zeros(n), residual
                best[cols] = x
    return best / scale


@pytest.mark.parametrize("seed", range(4))
def test_nnls_equals_least_squares_per_support_on_step_shapes(seed):
    # Features as the live refit sees them (relative-error weighting, 1 to 10^8 in scale), some
    # costs truly zero; plus a column of zeros and a repeated column, which make supports singular.
    rng = random.Random(seed)
    rows = []
    for _ in range(rng.randrange(20, 400)):
        batch = [RowShape(rng.choice(EXITS), rng.choice([1, 1, 1, 64]), rng.randint(0, 4000))
                 for _ in range(rng.randint(1, 64))]
        rows.append(StepShape.of(batch, FULL).features())
    features = np.array(rows, dtype=np.float64)  # [N, 6]
    truth = np.array([1e-3, 2e-4, 1e-6, 5e-7, 1e-5, 1e-9]) * np.array([rng.choice([0.0, 1.0]) for _ in range(6)])
    seconds = features @ truth * np.array([rng.uniform(0.8, 1.25) for _ in rows]) + 1e-4
    weight = 1 / seconds
    for a in (features * weight[:, None],
              np.hstack([features * weight[:, None], np.zeros((len(rows), 1)), features[:, 1:2] * weight[:, None]])):
        b = seconds * weight
        x, reference = nnls(a, b), _nnls_by_lstsq(a, b)
        assert (x >= 0).all()
        got, want = float(np.sum((a @ x - b) ** 2)), float(np.sum((a @ reference - b) ** 2))
        assert got <= want * (1 + 1e-9) + 1e-15, (got, want)
        np.testing.assert_allclose(a @ x, a @ reference, rtol=1e-6, atol=1e-9)


def test_fit_recovers_costs_from_noisy_steps_and_deeper_exits_are_never_cheaper():
    rng = random.Random(0)
    truth = cost()
    samples = []
    for _ in range(200):
        rows = [RowShape(rng.choice(EXITS), rng.choice([1, 1, 1, 32]), rng.randint(0, 300)) for _ in range(rng.randint(1, 16))]
        shape = StepShape.of(rows, FULL)
        samples.append((shape, truth.seconds(shape) * rng.uniform(0.8, 1.25)))  # a noisy, busy machine
    fitted = StepCostModel(FULL)
    fitted.fit(samples)
    assert all(c >= 0 for c in fitted.coefficients)
    for rows in ([RowShape(8, 1, 100)], [RowShape(e, 1, 100) for e in EXITS] * 4):
        assert fitted.step_seconds(rows) == pytest.approx(truth.step_seconds(rows), rel=0.15)
    for batch in (1, 4, 16):
        steps = [fitted.step_seconds([RowShape(e, 1, 64)] * batch) for e in EXITS]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_online_refit_follows_a_machine_that_slows_down():
    model = cost()
    shapes = [StepShape.of([RowShape(e, 1, 50)] * b, FULL) for e in EXITS for b in (1, 8)]
    model.fit([(s, model.seconds(s)) for s in shapes])
    before = model.step_seconds([RowShape(22, 1, 50)])
    for _ in range(8):
        for s in shapes:
            model.observe(s, 2 * cost().seconds(s))  # everything now takes twice as long
    assert model.step_seconds([RowShape(22, 1, 50)]) == pytest.approx(2 * before, rel=0.2)


# ---- latency model -----------------------------------------------------------------------------

def test_idle_prediction_is_prefill_then_decode_steps():
    m = LatencyModel(cost())
    p = m.predict(22, 100, 10, idle())
    prefill = cost().step_seconds([RowShape(22, 100, 0)])
    step = cost().step_seconds([RowShape(22, 1, 105)])
    assert p.full_pace_s == pytest.approx(prefill + 9 * step)
    assert p.best_pace_s == pytest.approx(p.full_pace_s)  # nobody deeper: both paces are its own


def test_next_to_deep_rows_full_pace_is_the_full_step_and_best_pace_is_faster():
    busy = LoadSnapshot(0.0, (RowLoad(FULL, 50, 40, 0), RowLoad(FULL, 50, 40, 0)), (), 8, 512)
    m = LatencyModel(cost(), starvation_ratio=1.0)
    p = m.predict(8, 10, 20, busy)
    full_step = cost().step_seconds([RowShape(FULL, 1, 50), RowShape(FULL, 1, 50), RowShape(8, 1, 20)])
    own = cost().step_seconds([RowShape(8, 1, 20)])
    assert p.pace_full_step_s == pytest.approx(full_step)
    assert p.pace_best_s == pytest.approx(full_step * 2 / (1 + full_step / own))
    assert own < p.pace_best_s < full_step


def test_predictions_grow_with_depth():
    m = LatencyModel(cost())
    busy = LoadSnapshot(0.0, tuple(RowLoad(e, 60, 20, 0) for e in EXITS), (), 8, 512)
    for load in (idle(), busy):
        full = [m.predict(e, 20, 50, load).full_pace_s for e in EXITS]
        best = [m.predict(e, 20, 50, load).best_pace_s for e in EXITS]
        assert full == sorted(full) and best == sorted(best)


# ---- router ------------------------------------------------------------------------------------

def router(policy: str = "best-effort") -> Router:
    return Router(LatencyModel(cost()), EXITS, policy)


def test_router_picks_the_deepest_exit_that_fits():
    r = router()
    best = {e: 1000 * r.model.predict(e, 20, 50, idle()).best_pace_s for e in EXITS}
    for e in EXITS:
        decision = r.route(best[e] + 0.01, 20, 50, idle())
        assert decision.exit_layer == e and decision.predicted_fit
    assert r.route(None, 20, 50, idle()).exit_layer == 30  # no budget: full depth
    assert r.route(1e9, 20, 50, idle()).exit_layer == 30


def test_unmeetable_budget_best_effort_or_reject_with_retry_after():
    decision = router().route(1.0, 20, 50, idle())
    assert decision.exit_layer == 8 and decision.predicted_fit is False
    with pytest.raises(BudgetUnmeetable, match="no exit can meet") as err:
        router("reject").route(1.0, 20, 50, idle())
    assert err.value.retry_after_s >= 1


def test_forced_exit_is_kept_and_judged():
    decision = router().route(1.0, 20, 50, idle(), forced_exit=22)
    assert decision.exit_layer == 22 and decision.forced and decision.predicted_fit is False


def test_a_shallow_exit_that_fits_only_when_paced_is_feasible_and_predicted_near_its_budget():
    deep = tuple(RowLoad(FULL, 50, 200, 0) for _ in range(6))
    load = LoadSnapshot(0.0, deep, (), 8, 512)
    r = router()
    p8 = r.model.predict(8, 10, 32, load)
    budget_s = 1.2 * p8.best_pace_s  # within its best pace, far from its full-step pace
    assert budget_s < p8.full_pace_s and budget_s < r.model.predict(15, 10, 32, load).best_pace_s
    decision = r.route(1000 * budget_s, 10, 32, load)
    assert decision.exit_layer == 8 and decision.predicted_fit
    # The scheduler paces it to finish a margin ahead of its deadline.
    assert decision.predicted_ms == pytest.approx(1000 * budget_s * (1 - r.model.deadline_margin))


def test_an_exit_that_would_make_an_admitted_request_late_is_not_feasible():
    m = LatencyModel(cost())
    # An admitted exit-8 request that needs almost all of its own pace: one more row breaks it.
    own = cost().step_seconds([RowShape(8, 1, 10)])
    tight = LoadSnapshot(0.0, (RowLoad(8, 10, 40, 0, deadline=40 * own * 1.02),), (), 8, 512)
    relaxed = LoadSnapshot(0.0, (RowLoad(8, 10, 40, 0, deadline=40 * own * 3),), (), 8, 512)
    for e in EXITS:
        assert not m.admitted_still_meet(e, tight)
        assert m.admitted_still_meet(e, relaxed)
    alone = 1000 * m.predict(22, 10, 4, idle()).best_pace_s
    decision = Router(m, EXITS).route(alone * 100, 10, 4, tight)
    assert decision.exit_layer == 8 and decision.predicted_fit is False  # best effort: shallowest, a predicted miss
    assert Router(m, EXITS).route(alone * 100, 10, 4, relaxed).exit_layer == FULL


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="budget policy"):
        Router(LatencyModel(cost()), EXITS, "sometimes")


def test_end_to_end_correction_is_learnt_per_admission_class_and_scales_predictions():
    m = LatencyModel(cost())
    assert m.e2e_factor(0.5, 1) == 1.0  # nothing learnt yet
    for i in range(8):
        m.observe_request(1.0, 2.0 + 0.01 * i, rows=1)  # alone: later arrivals doubled the time
    for i in range(8):
        m.observe_request(1.0, 1.1, rows=12)  # admitted into a big batch: close to predicted
    assert m.e2e_factor(0.5, 1) == pytest.approx(2.04)
    assert m.e2e_factor(0.5, 12) == pytest.approx(1.1)
    assert m.e2e_factor(0.9, 40) > 1.1  # an unseen class pools every class
    r = Router(m, EXITS)
    decision = r.route(None, 20, 50, idle())
    assert decision.batch_rows == 1
    assert decision.predicted_ms == pytest.approx(decision.expected_ms * m.e2e_factor(0.5, 1))
