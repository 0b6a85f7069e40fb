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
    predicted_ms: float  # predicted end-to-end latency at the chosen exit
    predicted_fit: bool | None  # whether the prediction fits the budget (None without a budget)
    forced: bool  # the client named the exit itself


@dataclass
class Router:
    model: LatencyModel
    exits: tuple[int, ...]  # shallow to deep, the full depth last
    policy: str = "best-effort"  # "best-effort": shallowest exit on a miss; "reject": refuse
    headroom: float = 0.1  # an exit fits when its prediction times (1 + headroom) is within budget

    def route(
        self,
        budget_ms: float | None,
        prompt_tokens: int,
        max_tokens: int,
        load: LoadSnapshot,
        forced_exit: int | None = None,
    ) -> RouteDecision:
        def predicted_ms(e: int) -> float:
            return 1000 * self.model.predict(e, prompt_tokens, max_tokens, load)

        if forced_exit is not None:
            ms = predicted_ms(forced_exit)
            fit = None if budget_ms is None else ms <= budget_ms
            return RouteDecision(forced_exit, budget_ms, ms, fit, forced=True)
        if budget_ms is None:
            full = self.exits[-1]
            return RouteDecision(full, None, predicted_ms(full), None, forced=False)
        for e in reversed(self.exits):  # deepest first
            ms = predicted_ms(e)
            if ms * (1 + self.headroom) <= budget_ms:
                return RouteDecision(e, budget_ms, ms, True, forced=False)
        shallowest = self.exits[0]
        ms = predicted_ms(shallowest)
        if self.policy == "reject":
            raise BudgetUnmeetable(budget_ms, ms)
        return RouteDecision(shallowest, budget_ms, ms, False, forced=False)
