"""Budget -> exit: the deepest exit whose predicted latency fits the request's budget."""

from __future__ import annotations

from dataclasses import dataclass

from balcony_runtime.errors import RequestError
from balcony_runtime.latency_model import LatencyModel, LoadSnapshot


class BudgetUnmeetable(RequestError):
    """No exit can meet the budget and the policy is to reject."""

    def __init__(self, budget_ms: float, best_ms: float):
        super().__init__(
            f"no exit can meet the latency budget of {budget_ms:.0f} ms under the current load "
            f"(fastest predicted: {best_ms:.0f} ms)"
        )
        self.budget_ms, self.best_ms = budget_ms, best_ms


@dataclass(frozen=True)
class RouteDecision:
    exit_layer: int  # chosen exit (num_layers = full depth)
    budget_ms: float | None  # the request's budget, if it had one
    predicted_ms: float  # predicted end-to-end latency at the chosen exit (scaled by the e2e factor)
    predicted_fit: bool | None  # whether the prediction fits the budget (None without a budget)
    forced: bool  # the client named the exit itself
    model_ms: float = 0.0  # the latency model's unscaled prediction (what it learns against)
    batch_rows: int = 1  # rows of the batch it was predicted to join (the factor's class)


@dataclass
class Router:
    model: LatencyModel
    exits: tuple[int, ...]  # shallow to deep, the full depth last
    policy: str = "best-effort"  # "best-effort": shallowest exit on a miss; "reject": refuse
    headroom: float = 0.0  # extra margin on top of the learnt end-to-end factor

    def route(
        self,
        budget_ms: float | None,
        prompt_tokens: int,
        max_tokens: int,
        load: LoadSnapshot,
        forced_exit: int | None = None,
    ) -> RouteDecision:
        rows = self.model.batch_rows(load)
        factor = self.model.e2e_factor(rows) * (1 + self.headroom)

        def decide(e: int, fit: bool | None, forced: bool) -> RouteDecision:
            return RouteDecision(e, budget_ms, model_ms[e] * factor, fit, forced, model_ms[e], rows)

        model_ms = {e: 1000 * self.model.predict(e, prompt_tokens, max_tokens, load) for e in self.exits}
        if forced_exit is not None:
            fit = None if budget_ms is None else model_ms[forced_exit] * factor <= budget_ms
            return decide(forced_exit, fit, forced=True)
        if budget_ms is None:
            return decide(self.exits[-1], None, forced=False)
        for e in reversed(self.exits):  # deepest first
            if model_ms[e] * factor <= budget_ms:
                return decide(e, True, forced=False)
        shallowest = self.exits[0]
        if self.policy == "reject":
            raise BudgetUnmeetable(budget_ms, model_ms[shallowest] * factor)
        return decide(shallowest, False, forced=False)
