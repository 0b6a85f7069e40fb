"""Budget -> exit: the deepest exit at which the request, and every admitted one, meets its deadline.

Feasibility is judged at the request's best pace under the scheduler's policy (depth-limited steps
when it is urgent), scaled by a high quantile of the measured / expected ratio of recent requests;
the latency reported back is the expected one (full steps while they fit the budget, else paced to
the deadline), scaled by the median ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from balcony_runtime.errors import RequestError
from balcony_runtime.routing.latency_model import LatencyModel, LoadSnapshot, Prediction


class BudgetUnmeetable(RequestError):
    """No exit can meet the budget and the policy is to reject."""

    def __init__(self, budget_ms: float, best_ms: float, retry_after_s: float):
        super().__init__(
            f"no exit can meet the latency budget of {budget_ms:.0f} ms under the current load "
            f"(fastest predicted: {best_ms:.0f} ms)"
        )
        self.budget_ms, self.best_ms, self.retry_after_s = budget_ms, best_ms, retry_after_s

    def __reduce__(self):  # pickled with its own arguments (it crosses from the engine's process)
        return type(self), (self.budget_ms, self.best_ms, self.retry_after_s)


POLICIES = ("best-effort", "reject")


@dataclass(frozen=True)
class RouteDecision:
    exit_layer: int  # chosen exit (num_layers = full depth)
    budget_ms: float | None  # the request's budget, if it had one
    predicted_ms: float  # expected end-to-end latency at the chosen exit, corrected by the median ratio
    predicted_fit: bool | None  # whether the chosen exit was predicted to meet the budget (None without one)
    forced: bool  # the client named the exit itself
    expected_ms: float = 0.0  # the model's uncorrected expectation (what the correction learns against)
    batch_rows: int = 1  # rows of the batch it was predicted to join (the correction's class)


@dataclass
class Router:
    model: LatencyModel
    exits: tuple[int, ...]  # exits it may pick, shallow to deep (the full depth last, if served)
    policy: str = "best-effort"  # "best-effort": shallowest exit on a miss; "reject": refuse
    feasibility_quantile: float = 0.9  # of measured / expected, applied when judging a budget

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"budget policy must be one of {POLICIES}, got {self.policy!r}")
        if not self.exits:
            raise ValueError("the router needs at least one exit")

    def route(
        self,
        budget_ms: float | None,
        prompt_tokens: int,
        max_tokens: int,
        load: LoadSnapshot,
        forced_exit: int | None = None,
    ) -> RouteDecision:
        model = self.model
        rows = model.batch_rows(load)
        median, high = model.e2e_factor(0.5, rows), max(1.0, model.e2e_factor(self.feasibility_quantile, rows))
        budget_s = None if budget_ms is None else budget_ms / 1000
        predictions: dict[int, Prediction] = {}

        def predict(e: int) -> Prediction:
            if e not in predictions:
                predictions[e] = model.predict(e, prompt_tokens, max_tokens, load)
            return predictions[e]

        def feasible(e: int) -> bool:
            return predict(e).best_pace_s * high <= budget_s and model.admitted_still_meet(e, load)

        def decide(e: int, fit: bool | None, forced: bool) -> RouteDecision:
            expected = predict(e).expected_s(budget_s, model.deadline_margin)
            return RouteDecision(e, budget_ms, 1000 * expected * median, fit, forced, 1000 * expected, rows)

        if forced_exit is not None:
            return decide(forced_exit, None if budget_s is None else feasible(forced_exit), forced=True)
        if budget_s is None:
            return decide(self.exits[-1], None, forced=False)
        for e in reversed(self.exits):  # deepest first
            if feasible(e):
                return decide(e, True, forced=False)
        shallowest = self.exits[0]
        if self.policy == "reject":
            best = predict(shallowest).best_pace_s * high
            # Come back when about the excess has drained: the gap between the best and the budget.
            raise BudgetUnmeetable(budget_ms, 1000 * best, retry_after_s=max(1.0, best - budget_s))
        return decide(shallowest, False, forced=False)
