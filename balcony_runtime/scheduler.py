"""Which requests run in the next step and how many tokens each: continuous batching. No torch.

Every step: running requests first (a decode is one token; an unfinished prefill continues with its
next chunk), then waiting requests in arrival order while sequence slots, the step's token budget
and free cache blocks last. Long prompts are split into chunks so running decodes keep moving. When
a running request cannot grow, the most recently admitted one is preempted (its blocks freed, its
tokens recomputed later), so requests that are running are never corrupted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens processed in one step (prefill chunks + decodes)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


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

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

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

    def schedule(self, now: float) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests, oldest first; a request that cannot grow evicts the newest.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.can_grow(request.request_id, request.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it preempted itself: nothing newer is left to run
            self.blocks.grow(request.request_id, request.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n
            i += 1

        # Waiting requests in arrival order, while they fit. Preempted ones went back to the front,
        # but are not readmitted in the step that evicted them.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request in preempted:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.can_allocate(request.num_cache_layers, n):
                break
            self.waiting.popleft()
            self.blocks.allocate(request.request_id, request.num_cache_layers, n)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n

        scheduled.sort(key=lambda s: -s.request.exit_layer)  # stable: deepest first
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def on_step_done(self, output: SchedulerOutput) -> None:
        """The runner has written this step's tokens into the cache."""
        for item in output.scheduled:
            item.request.num_computed_tokens = item.start + item.num_tokens
