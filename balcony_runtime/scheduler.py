"""Which requests run in the next step, how many tokens each, and how deep the step goes. No torch.

Continuous batching: running requests first (a decode is one token; an unfinished prefill continues
with its next chunk), then waiting requests while sequence slots, the step's token budget and free
cache blocks last. Long prompts are split into chunks so running decodes keep moving. When a running
request cannot grow, a victim is preempted (its blocks freed, its tokens recomputed later): the one
with the latest deadline among those not yet scheduled this step, the newest on a tie.

Deadlines and limited steps. A step is paced by its deepest row, and on a CPU by its row count too,
so a shallow request that rides with everyone else gains little from its exit. When a request with a
deadline would miss it if every remaining step ran every row, and could still meet it in steps of its
own, it is *urgent*, and the step runs a chosen subset of rows instead of all of them:
  1. urgent requests, earliest deadline first, each joining while every chosen one still meets its
     deadline at the step's predicted cost (one that would break that waits: it cannot be saved
     without sinking an earlier-due one);
  2. then other rows no deeper than the deepest chosen exit, earliest due first, while every chosen
     request keeps ``deadline_margin`` of its time in hand: rows that cost the step (nearly) nothing,
     as on a GPU where a step barely grows with its rows, ride along; on a CPU, where each row adds
     to the step, they wait for the next step of every row.
The model runs only the chosen rows: the fewer layers of their deepest exit, and the head once.
Requests that are fine on steps of every row never trigger this, nor do hopeless ones (late even in
steps of their own: they have missed, and speeding them only taxes everyone else).

The starvation bound: a row left out of limited steps accumulates their measured time, and once that
reaches ``starvation_ratio`` times the predicted step of every row, the next step runs every row. So
between two of its tokens a request waits at most its own step plus about ``starvation_ratio`` full
steps (plus the one limited step that crossed the line): its decode slows by at most a factor of
about 1 + starvation_ratio, and only while urgent requests exist. Urgency is judged at the pace this
interleaving allows (``interleaved_pace``), not at the limited step's cost alone.

Waiting requests are admitted preempted-first, then earliest deadline first; a request without a
budget counts as due ``unbudgeted_horizon_s`` after its arrival, so a stream of budgeted arrivals
delays it at most that long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request, RequestStatus
from balcony_runtime.routing.step_cost import RowShape, StepCostModel
from balcony_runtime.routing.urgency import Urgency, interleaved_pace, urgency


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens processed in one step (prefill chunks + decodes)
    starvation_ratio: float = 1.0  # rows left out of limited steps wait at most this many full steps
    deadline_margin: float = 0.1  # a request is urgent when full steps would use more than 1 - this of its time left
    unbudgeted_horizon_s: float = 30.0  # admission treats a request without a budget as due this long after arrival

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.starvation_ratio < 0 or not 0 <= self.deadline_margin < 1 or self.unbudgeted_horizon_s < 0:
            raise ValueError("starvation_ratio and unbudgeted_horizon_s must be >= 0, deadline_margin in [0, 1)")


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # first token of this step's chunk (== request.num_computed_tokens)
    num_tokens: int  # tokens fed this step

    @property
    def completes_sequence(self) -> bool:
        """After this step every known token is cached, so the model's next token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # deepest exit first (the model's row order)
    preempted: list[Request] = field(default_factory=list)  # sent back to the queue this step
    depth_limit: int | None = None  # a limited step: the deepest exit it ran (None: every row could run)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, step_cost: StepCostModel | None = None):
        self.config = config
        self.blocks = block_manager
        self.step_cost = step_cost  # None: no deadline scheduling (every step may run every row)
        self.waiting: list[Request] = []  # admission order is chosen at each step (see admission_order)
        self.running: list[Request] = []  # admission order

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Take a request out of the queues and free its blocks (finished, stopped or aborted)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    # ---- priorities ------------------------------------------------------------------------

    def due(self, request: Request) -> float:
        """When a request should finish: its deadline, or the horizon after arrival without one."""
        if request.deadline is not None:
            return request.deadline
        return request.arrival_time + self.config.unbudgeted_horizon_s

    def admission_order(self) -> list[Request]:
        """Waiting requests in the order they are admitted: preempted ones first (they were running
        and lost their cache), then earliest due."""
        return sorted(self.waiting, key=lambda r: (r.num_preemptions == 0, self.due(r), r.arrival_time))

    def choose_rows(self, now: float) -> list[Request] | None:
        """The running requests a limited step runs (see the module docstring), or None for a step of every row."""
        cost, running, config = self.step_cost, self.running, self.config
        if cost is None or not any(r.deadline is not None for r in running):
            return None
        shape = {r.request_id: RowShape(r.exit_layer, 1, r.num_computed_tokens) for r in running}
        full_step = cost.step_seconds(list(shape.values()))

        def meets(rows: list[Request], protected: list[Request], margin: float) -> bool:
            """Whether every protected request meets its deadline (keeping ``margin`` of its time in
            hand) when limited steps run ``rows``."""
            pace = interleaved_pace(cost.step_seconds([shape[r.request_id] for r in rows]), full_step,
                                    config.starvation_ratio)
            return all(r.num_remaining_steps * pace <= (r.deadline - now) * (1 - margin) for r in protected)

        def alone(r: Request) -> float:
            return interleaved_pace(cost.step_seconds([shape[r.request_id]]), full_step, config.starvation_ratio)

        urgent = [r for r in running if r.deadline is not None and urgency(
            r.num_remaining_steps, r.deadline - now, full_step, alone(r), config.deadline_margin) is Urgency.URGENT]
        chosen: list[Request] = []
        for r in sorted(urgent, key=lambda r: (r.deadline, r.arrival_time)):
            if meets(chosen + [r], chosen + [r], 0.0):
                chosen.append(r)
        if not chosen or len(chosen) == len(running):
            return None
        protected = list(chosen)
        depth = max(r.exit_layer for r in chosen)
        riders = [r for r in running if r not in chosen and r.exit_layer <= depth]
        for r in sorted(riders, key=lambda r: (self.due(r), r.arrival_time)):
            if meets(chosen + [r], protected, config.deadline_margin):
                chosen.append(r)
        limit = config.starvation_ratio * full_step
        ids = {r.request_id for r in chosen}
        if any(r.waited_s >= limit for r in running if r.request_id not in ids):
            return None  # someone left out has waited its bound: everyone runs
        return chosen

    # ---- the step --------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        chosen = self.choose_rows(now)
        depth = None if chosen is None else max(r.exit_layer for r in chosen)
        chosen_ids = None if chosen is None else {r.request_id for r in chosen}
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests in admission order; one that cannot grow evicts a victim.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if chosen_ids is not None and request.request_id not in chosen_ids:
                i += 1
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.can_grow(request.request_id, request.num_computed_tokens + n):
                victim = self._victim(self.running[i:])
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue  # it preempted itself; the next request now sits at index i
            self.blocks.grow(request.request_id, request.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n
            i += 1

        # Waiting requests, while they fit; preempted ones are not readmitted in the step that
        # evicted them. One that does not fit stops admission (no overtaking by smaller ones).
        for request in self.admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request in preempted:
                break
            if depth is not None and (request.exit_layer > depth or request.deadline is None):
                continue  # a limited step admits only budgeted newcomers within its depth
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.can_allocate(request.num_cache_layers, n):
                break
            self.waiting.remove(request)
            self.blocks.allocate(request.request_id, request.num_cache_layers, n)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n

        scheduled.sort(key=lambda s: -s.request.exit_layer)  # stable: deepest first
        return SchedulerOutput(scheduled, preempted, depth)

    def _victim(self, candidates: list[Request]) -> Request:
        """The request to preempt among those not yet scheduled this step: latest due, newest on a tie."""
        return max(reversed(candidates), key=self.due)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.waited_s = 0.0
        self.waiting.append(request)

    def on_step_done(self, output: SchedulerOutput, seconds: float = 0.0) -> None:
        """The runner has written this step's tokens into the cache; it took ``seconds``."""
        ran = set()
        for item in output.scheduled:
            item.request.num_computed_tokens = item.start + item.num_tokens
            item.request.waited_s = 0.0
            ran.add(item.request.request_id)
        for request in self.running:
            if request.request_id not in ran:
                request.waited_s += seconds
