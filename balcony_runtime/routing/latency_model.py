"""A request's end-to-end latency at each exit under the current load and the scheduler's policy.

Built on the step-cost model (routing/step_cost.py), so a deeper exit is never predicted faster.
A request arriving now at exit e, with P prompt tokens and n tokens to generate:

    queue wait (a slot frees)  +  prefill (prompts ahead of it, then its own, in token-budget chunks)
        +  (n - 1) * pace

where the pace is the time between two of its tokens. Riding full steps (every running row), the
pace is the full step's cost ``f``. Under deadline scheduling (scheduler.py) an urgent request runs
in depth-limited steps of cost ``p`` (only rows at or below its exit), interleaved with the full
steps the starvation bound forces: one full step per ``starvation_ratio * f`` seconds of limited
steps, so its best pace is ``f (1 + r) / (1 + r f / p)``, or ``p`` when no deeper row runs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from balcony_runtime.routing.step_cost import RowShape, StepCostModel


@dataclass(frozen=True)
class RowLoad:
    """One running or queued request, as a newcomer's prediction needs it."""

    exit_layer: int  # its exit (the full depth for the full model)
    context_tokens: int  # tokens it holds in context (prompt + generated so far)
    remaining_steps: int  # decode steps it still needs
    pending_prefill_tokens: int  # prompt tokens not yet in its cache
    deadline: float | None = None  # time.monotonic() it is due, if it has a budget


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load when a request arrives."""

    now: float  # time.monotonic()
    running: tuple[RowLoad, ...]
    waiting: tuple[RowLoad, ...]
    max_num_seqs: int  # running slots
    max_num_batched_tokens: int  # tokens per step (prefill is chunked to this)

    @property
    def rows(self) -> tuple[RowLoad, ...]:
        return self.running + self.waiting


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds for one request at one exit."""

    full_pace_s: float  # riding full steps the whole way
    best_pace_s: float  # urgent the whole way: the fastest the scheduler will serve it
    pace_full_step_s: float  # seconds between its tokens on full steps
    pace_best_s: float  # seconds between its tokens when urgent

    def expected_s(self, budget_s: float | None, margin: float) -> float:
        """What to expect: full steps while they meet the budget; if only its best pace does, the
        scheduler paces it to finish ``margin`` ahead of the deadline; if not even that, it gets
        no priority (the scheduler does not speed up a request that will be late) and rides full steps."""
        if budget_s is None or self.full_pace_s <= budget_s * (1 - margin) or self.best_pace_s > budget_s:
            return self.full_pace_s
        return max(self.best_pace_s, budget_s * (1 - margin))


@dataclass
class LatencyModel:
    step_cost: StepCostModel
    starvation_ratio: float = 2.0  # the scheduler's (SchedulerConfig.starvation_ratio)
    deadline_margin: float = 0.1  # the scheduler's (SchedulerConfig.deadline_margin)
    # Measured / expected end-to-end seconds of recent requests: what the step model misses
    # (arrivals that join later, other prompts' prefill chunks, host work between steps), learnt
    # per admission class (the batch a request joined, to a factor of 2): a request admitted into a
    # small batch is slowed far more by later arrivals than one admitted into a full one.
    e2e_ratios: dict = field(default_factory=dict)  # e2e_class -> deque of measured / expected
    e2e_window: int = 64  # finished requests remembered per class: recent enough to follow the load
    min_e2e_samples: int = 8  # below this many in a class, every class pooled; below it pooled, no correction

    @property
    def full_depth(self) -> int:
        return self.step_cost.full_depth

    @staticmethod
    def e2e_class(rows: int) -> int:
        """Admission class: rows 1, 2-3, 4-7, 8-15, ... of the batch a request joins."""
        return max(1, rows).bit_length()

    @staticmethod
    def batch_rows(load: LoadSnapshot) -> int:
        """Rows of the batch a request arriving now joins: running and queued requests, and itself."""
        return min(len(load.rows) + 1, load.max_num_seqs)

    def e2e_factor(self, quantile: float, rows: int) -> float:
        """The ``quantile`` of measured / expected for requests admitted into a batch of ``rows``
        (its class; every class pooled while it has too few; 1 while all have too few)."""
        ratios = list(self.e2e_ratios.get(self.e2e_class(rows), ()))
        if len(ratios) < self.min_e2e_samples:
            ratios = [r for window in list(self.e2e_ratios.values()) for r in list(window)]
        if len(ratios) < self.min_e2e_samples:
            return 1.0
        ratios.sort()
        return ratios[min(len(ratios) - 1, int(quantile * len(ratios)))]

    def observe_request(self, expected_s: float, measured_s: float, rows: int) -> None:
        """Learn from one finished request: ``expected_s`` as routed, ``rows`` its admission batch."""
        if expected_s > 0 and measured_s > 0:
            window = self.e2e_ratios.setdefault(self.e2e_class(rows), deque(maxlen=self.e2e_window))
            window.append(measured_s / expected_s)

    def pace(self, rows: list[RowShape], exit_layer: int) -> tuple[float, float]:
        """(full step, best pace) for a row at ``exit_layer`` decoding among ``rows`` (itself included)."""
        cost = self.step_cost
        full = cost.step_seconds(rows)
        own = cost.step_seconds([r for r in rows if r.exit_layer <= exit_layer])
        if all(r.exit_layer <= exit_layer for r in rows) or own <= 0:
            return full, min(full, own) if own > 0 else full
        r = self.starvation_ratio
        interleaved = full * (1 + r) / (1 + r * full / own)
        return full, min(full, interleaved)

    def predict(self, exit_layer: int, prompt_tokens: int, max_tokens: int, load: LoadSnapshot) -> Prediction:
        cost = self.step_cost
        others = load.rows[: load.max_num_seqs - 1]  # those that will share its steps
        decode_rows = [RowShape(o.exit_layer, 1, o.context_tokens) for o in others]
        mine = RowShape(exit_layer, 1, prompt_tokens + max_tokens // 2)  # its mean context
        full_step, best = self.pace(decode_rows + [mine], exit_layer)

        # Queue: with no free slot, it waits for the (queued ahead + 1)-th running request to finish.
        wait = 0.5 * cost.step_seconds(decode_rows)  # joins at the next step boundary
        slots_needed = len(load.rows) + 1 - load.max_num_seqs
        if slots_needed > 0 and load.running:
            steps = sorted(o.remaining_steps for o in load.running)
            wait += steps[min(slots_needed, len(steps)) - 1] * cost.step_seconds(decode_rows)

        # Prefill: prompts ahead (first come, first served) and its own, in chunks of the step's token budget.
        prefill_rows = [RowShape(o.exit_layer, o.pending_prefill_tokens, o.context_tokens - o.pending_prefill_tokens)
                        for o in others if o.pending_prefill_tokens > 1]
        prefill_rows.append(RowShape(exit_layer, prompt_tokens, 0))
        tokens = sum(r.num_tokens for r in prefill_rows)
        chunks = max(1, math.ceil(tokens / load.max_num_batched_tokens))
        decoding = [RowShape(o.exit_layer, 1, o.context_tokens) for o in others if o.pending_prefill_tokens <= 1]
        prefill = cost.step_seconds(decoding + prefill_rows) + (chunks - 1) * cost.step_seconds(decoding)

        steps = max(0, max_tokens - 1)  # the step ending its prefill samples the first token
        start = wait + prefill
        return Prediction(start + steps * full_step, start + steps * best, full_step, best)

    def admitted_still_meet(self, exit_layer: int, load: LoadSnapshot) -> bool:
        """Whether every admitted request with a deadline that can meet it now still can with one
        more row at ``exit_layer`` (each at its best pace)."""
        rows = [RowShape(o.exit_layer, 1, o.context_tokens) for o in load.rows[: load.max_num_seqs]]
        newcomer = RowShape(exit_layer, 1, 0)
        for o in load.running:
            if o.deadline is None:
                continue
            left = o.deadline - load.now
            _, before = self.pace(rows, o.exit_layer)
            if o.remaining_steps * before > left:
                continue  # already late: one more row does not change that
            _, after = self.pace(rows + [newcomer], o.exit_layer)
            if o.remaining_steps * after > left:
                return False
        return True
