"""Which requests run in the next step, how many tokens each, and how deep the step goes. No torch.

Continuous batching: running requests first (a decode is one token; an unfinished prefill continues
with its next chunk), then waiting requests while sequence slots, the step's token budget and free
cache blocks last. Long prompts are split into chunks so running decodes keep moving. When a running
request cannot grow, a victim is preempted (its blocks freed, its tokens recomputed later): the one
with the latest deadline among those not yet scheduled this step, the newest on a tie.

Deadlines and depth-limited steps. A step is paced by its deepest row, so a shallow request that
rides with full-depth ones gains nothing from its exit. When a request with a deadline would miss it
if every remaining step ran at full depth, and could still meet it at its own depth, it is *urgent*:
the step then runs only the rows whose exit is at or below D, the deepest urgent exit (a prefix of
the batch ordered deepest first, so the model runs fewer layers and the head once). Requests that
are fine on full steps never trigger this, nor do hopeless ones (late even at their own pace: they
have missed, and speeding them only taxes everyone else).

The starvation bound: a row left out of depth-limited steps accumulates their measured time, and
once that reaches ``starvation_ratio`` times the predicted full step, the next step runs every row.
So between two of its tokens a request waits at most its own step plus about ``starvation_ratio``
full steps (plus the one depth-limited step that crossed the line): its decode slows by at most a
factor of about 1 + starvation_ratio, and only while urgent requests exist.

Waiting requests are admitted preempted-first, then earliest deadline first; a request without a
budget counts as due ``unbudgeted_horizon_s`` after its arrival, so a stream of budgeted arrivals
delays it at most that long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

import numpy as np

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.request import Request, RequestStatus
from balcony_runtime.routing.step_cost import RowShape, StepCostModel


_exit_of = attrgetter("request.exit_layer")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens processed in one step (prefill chunks + decodes)
    starvation_ratio: float = 2.0  # rows skipped by depth-limited steps wait at most this many full steps (why 2, not 1: docs/benchmarks.md, "Budgets under load")
    deadline_margin: float = 0.1  # a request is urgent when full steps would use more than 1 - this of its time left
    unbudgeted_horizon_s: float = 30.0  # admission treats a request without a budget as due this long after arrival

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.starvation_ratio < 0 or not 0 <= self.deadline_margin < 1 or self.unbudgeted_horizon_s < 0:
            raise ValueError("starvation_ratio and unbudgeted_horizon_s must be >= 0, deadline_margin in [0, 1)")


class ScheduledRequest:
    """One request's share of a step. A plain class with slots: the scheduler makes one per row per
    step, and a dataclass's __post_init__ was a measurable share of that."""

    __slots__ = ("request", "start", "num_tokens", "completes_sequence")

    def __init__(self, request: Request, start: int, num_tokens: int, completes_sequence: bool | None = None):
        self.request = request
        self.start = start  # first token of this step's chunk (== request.num_computed_tokens)
        self.num_tokens = num_tokens  # tokens fed this step
        # After this step every known token is cached, so the model's next token is sampled. Fixed
        # when scheduled (the request gains its sampled token only after the step); read several
        # times a step. The scheduler passes it; other callers may leave it to be worked out.
        self.completes_sequence = (start + num_tokens == request.num_tokens if completes_sequence is None
                                   else completes_sequence)

    def __repr__(self) -> str:
        return (f"ScheduledRequest({self.request.request_id!r}, start={self.start}, "
                f"num_tokens={self.num_tokens}, completes_sequence={self.completes_sequence})")


class SteadyRows(Sequence[ScheduledRequest]):
    """A steady decode plan's rows (SchedulerOutput.scheduled), each made only when read. The
    step's hot path takes a steady plan's requests and starts from its DecodeRun instead, so most
    steady plans never make a row (an object per row per step was a good part of the plan at
    hundreds of rows; docs/benchmarks.md, "A short path for plain outputs"). Iterating makes them
    all, once; an index read before that makes that one row alone (a new object at each such read)."""

    __slots__ = ("_run", "_items")

    def __init__(self, run: "DecodeRun"):
        self._run = run
        self._items: list[ScheduledRequest] | None = None

    def __len__(self) -> int:
        return len(self._run.requests)

    def __getitem__(self, index):
        if self._items is None and isinstance(index, int):
            run = self._run
            return ScheduledRequest(run.requests[index], int(run.starts[index]), 1, True)
        return self._made()[index]

    def __iter__(self):
        return iter(self._made())

    def _made(self) -> list[ScheduledRequest]:
        if self._items is None:
            run = self._run
            self._items = list(map(ScheduledRequest, run.requests, run.starts.tolist(), repeat(1), repeat(True)))
        return self._items


@dataclass
class SchedulerOutput:
    scheduled: Sequence[ScheduledRequest]  # deepest exit first (the model's row order); a steady plan's: SteadyRows
    preempted: list[Request] = field(default_factory=list)  # sent back to the queue this step
    depth_limit: int | None = None  # only rows with exit <= this ran (None: every row could)
    # Set when the plan is the last one's rows one token on (a steady decode, see _SteadyDecode),
    # every row one token that completes its sequence. Readers may take the rows and their starts
    # from here instead of from each ScheduledRequest.
    decode_run: "DecodeRun | None" = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """A steady decode plan's rows, as arrays and lists kept from plan to plan."""

    requests: list[Request]  # in the plan's order: the same list object for as long as the steady decode goes on
    starts: np.ndarray  # [B] int64 each row's start in this plan
    # [B] int64 starts + 1: each row's context once this step's token is cached (the step's
    # context lengths, and the next plan's starts). Neither array is written after the plan is made.
    ends: np.ndarray
    max_end: int  # ends' largest (every row moves one token a plan, so it is kept, not reduced)
    # Some row samples its last token (by max_tokens) in this plan: its output ends with it.
    ends_a_row: bool
    # The blocks the plan took for its rows, when it can tell (see GrownBlocks); None: the batch's
    # tables find the rows that read a block they lack by comparing counts.
    grown: "GrownBlocks | None" = None


@dataclass(frozen=True, slots=True)
class GrownBlocks:
    """The rows of a steady decode that reached a new block in this plan, and the block each took
    at every cache layer. Given when each row's blocks end where its context does, so these rows
    are exactly those whose context crosses into a block the batch's tables have not written
    (ModelRunner.prepare writes them as given, without looking for them)."""

    rows: np.ndarray  # [G] int64 plan rows, in the order they took their blocks
    # One exit: [G, L] int64 block ids, the exit's cache layers in order. Mixed exits: [N] int64,
    # each row's ids in turn (its exit's cache layers in order).
    ids: np.ndarray
    exit_layer: int | None  # the rows' one exit; None: mixed, each row's in row_exits
    row_exits: tuple[int, ...] = ()  # [G] (mixed exits only)


@dataclass(slots=True)
class _SteadyDecode:
    """The last plan, when it ran every running request one decode token that completes its
    sequence, deepest exit first. Under steady load most plans are that one again, each row one
    token on: then the next plan is worked out with a few array operations over the rows
    (Scheduler._schedule_steady) instead of a pass of Python over every request."""

    running: list[Request]  # Scheduler.running when the plan was made (a copy, compared by identity)
    rows: list[Request]  # the plan's requests, in its order
    to_running: np.ndarray | None  # [B] each row's index in running (growth goes in running order); None: row b is running[b]
    ends: np.ndarray  # [B] int64 each row's start in the plan + 1 (DecodeRun.ends): its start in the next
    # Plans of these rows left before a row's start reaches its last (prompt + max_tokens - 1: it
    # then holds all its tokens, the last maybe a placeholder still being sampled): min over the rows
    # of that start - ends, one less each plan (every row moves one token a plan).
    plans_left: int
    capacity: np.ndarray  # [B] int64 tokens each row's blocks hold
    max_end: int  # ends' largest
    # Set when every row's blocks end where its context does (capacity == ends rounded up to a
    # block): then the rows reaching a new block are exactly those whose context crosses into one,
    # and each plan hands its take on (DecodeRun.grown). This one stands for a plan in which no row
    # grows (exit_layer None: rows at several exits). None otherwise (the batch compares counts).
    no_growth: GrownBlocks | None
    # Whether rows is in the order the runner's batch holds them (Scheduler.follow_batch_order); a
    # plan in that order lets the runner reuse the lists of its first step.
    in_batch_order: bool = False


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, step_cost: StepCostModel | None = None):
        self.config = config
        self.blocks = block_manager
        self.step_cost = step_cost  # None: no deadline scheduling (every step may run every row)
        self.waiting: list[Request] = []  # admission order is chosen at each step (see admission_order)
        self.running: list[Request] = []  # admission order
        self.steady_decodes = True  # plan a steady decode with array operations (False: always row by row)
        self._steady: _SteadyDecode | None = None
        self._some_waited = False  # a running request's waited_s may be above 0 (on_step_timed)

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

    def choose_depth(self, now: float) -> int | None:
        """The step's depth limit (see the module docstring), or None for a step of every row."""
        cost, running = self.step_cost, self.running
        if cost is None or not any(r.deadline is not None for r in running):
            return None
        deepest = max(r.exit_layer for r in running)
        rows = [RowShape(r.exit_layer, 1, r.num_computed_tokens) for r in running]
        full_step = cost.step_seconds(rows)
        own_steps: dict[int, float] = {}  # exit -> a step of the rows at or below it (shared by its requests)
        urgent: list[int] = []
        for r in running:
            if r.deadline is None or r.exit_layer >= deepest:
                continue
            left, steps = r.deadline - now, r.num_remaining_steps
            if steps * full_step <= left * (1 - self.config.deadline_margin):
                continue  # fine riding full steps
            if r.exit_layer not in own_steps:
                own_steps[r.exit_layer] = cost.step_seconds([o for o in rows if o.exit_layer <= r.exit_layer])
            if steps * own_steps[r.exit_layer] > left:
                continue  # hopeless: it misses even at its own pace
            urgent.append(r.exit_layer)
        if not urgent:
            return None
        depth = max(urgent)
        limit = self.config.starvation_ratio * full_step
        if any(r.waited_s >= limit for r in running if r.exit_layer > depth):
            return None  # someone deeper has waited its bound: everyone runs
        return depth

    # ---- the step --------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        depth = self.choose_depth(now)
        preempted: list[Request] = []
        # Running rows first, their new blocks taken together; if the pool cannot give them all,
        # again row by row, preempting as it goes (nothing changed before that: the first pass
        # only plans). A steady decode, the last plan one token on, is planned from arrays.
        steady = self._schedule_steady() if depth is None and self._steady is not None else None
        run = None
        if steady is not None:
            run, budget = steady
            scheduled = SteadyRows(run)
        else:
            planned = self._schedule_running(depth, preempted, together=True)
            scheduled, budget = (planned if planned is not None
                                 else self._schedule_running(depth, preempted, together=False))

        # Waiting requests, while they fit; preempted ones are not readmitted in the step that
        # evicted them. One that does not fit stops admission (no overtaking by smaller ones).
        # With every sequence slot taken, none is admitted: the queue is not even sorted (with a
        # deep queue behind a full batch, the sort was most of a step).
        admissible = budget > 0 and len(self.running) < self.config.max_num_seqs and self.waiting
        if admissible and run is not None:
            scheduled = list(scheduled)  # (admitted rows join it)
        for request in self.admission_order() if admissible else ():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request in preempted:
                break
            if depth is not None and request.exit_layer > depth:
                continue
            if request.waits_for_leader:
                continue  # another choice is computing the prompt they share
            reuse = None  # a cached prefix (prompt logprobs need the logits of every prompt token)
            if request.params.prompt_logprobs is None:
                reuse = self.blocks.cached_prefix(request.cache_layers, request.prompt_token_ids, request.num_tokens)
            cached = reuse.num_blocks * self.blocks.block_size if reuse is not None else 0
            n = min(request.num_tokens - cached, budget)
            if not self.blocks.can_allocate(request.num_cache_layers, cached + n, reuse):
                break
            self.waiting.remove(request)
            self.blocks.allocate(request.request_id, request.num_cache_layers, cached + n, request.cache_layers, reuse)
            request.num_computed_tokens = cached
            request.num_cached_tokens += cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n

        if run is not None and len(scheduled) == len(run.requests):  # the steady decode goes on (nobody admitted)
            return SchedulerOutput(scheduled, preempted, depth, decode_run=run)
        scheduled.sort(key=_exit_of, reverse=True)  # deepest first; reverse keeps ties in order (stable)
        self._steady = self._steady_from(scheduled) if depth is None and not preempted else None
        return SchedulerOutput(scheduled, preempted, depth)

    def _steady_from(self, scheduled: list[ScheduledRequest]) -> _SteadyDecode | None:
        """The steady decode that this plan (deepest first) starts, if it is one: every running
        request one token that completes its sequence."""
        running = self.running
        if (not self.steady_decodes or not scheduled or len(scheduled) != len(running)
                or any(item.num_tokens != 1 or not item.completes_sequence for item in scheduled)):
            return None
        rows = [item.request for item in scheduled]
        to_running = None  # rows in the running order (one exit, or admitted deepest first)
        if any(a is not b for a, b in zip(rows, running)):
            index = {id(r): i for i, r in enumerate(running)}
            to_running = np.array([index[id(r)] for r in rows], dtype=np.int64)
        capacity = self.blocks.capacity
        starts = [item.start for item in scheduled]
        ends = np.array(starts, dtype=np.int64) + 1  # [B]
        capacities = np.array([capacity(r.request_id) for r in rows], dtype=np.int64)  # [B]
        no_growth = None
        exit_layer, size = rows[0].exit_layer, self.blocks.block_size
        if np.array_equal(capacities, -(-ends // size) * size):
            one_exit = all(r.exit_layer == exit_layer for r in rows)
            no_growth = GrownBlocks(np.empty(0, dtype=np.int64),
                                    np.empty((0, rows[0].num_cache_layers) if one_exit else 0, dtype=np.int64),
                                    exit_layer if one_exit else None)
        last_starts = np.array([len(r.prompt_token_ids) + r.params.max_tokens - 1 for r in rows], dtype=np.int64)
        return _SteadyDecode(list(running), rows, to_running, ends, int((last_starts - ends).min()), capacities,
                             max(starts) + 1, no_growth)

    def _schedule_steady(self) -> tuple["DecodeRun", int] | None:
        """The last plan's rows one token on, if it was a steady decode and still is one: the same
        running requests (none finished, preempted or admitted since), each one new token past the
        last plan's (a step adds exactly one: its sampled token, or an overlapped step's
        placeholder), none at its last token, within the budget, their new blocks given. Else
        None, with nothing changed. The same plan _schedule_running makes, rows in the plan's order."""
        steady, running = self._steady, self.running
        budget = self.config.max_num_batched_tokens
        # (On None the row-by-row pass follows, and schedule() replaces or drops self._steady.)
        if running != steady.running or len(running) > budget:  # (compared by identity: Request has no __eq__)
            return None
        starts = steady.ends  # [B] each row one token on
        if steady.plans_left <= 0:  # a row has all its tokens, its last still being sampled (overlapped)
            return None
        ends = starts + 1  # [B]
        grow = (ends > steady.capacity).nonzero()[0]  # [G] rows reaching a new block
        grown = steady.no_growth
        if len(grow):
            if steady.to_running is not None:  # in running order, as the pass takes them
                grow = grow[np.argsort(steady.to_running[grow])]
            rows = steady.rows
            taken = self.blocks.try_take_for([(rows[b].request_id, end) for b, end in zip(grow.tolist(), ends[grow].tolist())])
            if taken is None:
                return None  # the pass row by row preempts
            # A row's blocks held its context, one token short of `ends`: each row here took one block.
            steady.capacity[grow] += self.blocks.block_size
            if grown is not None:  # each row's new block at every cache layer of its exit, in take order
                grown = (GrownBlocks(grow, taken.reshape(len(grow), -1), grown.exit_layer) if grown.exit_layer is not None
                         else GrownBlocks(grow, taken, None, tuple(rows[b].exit_layer for b in grow.tolist())))
        steady.ends = ends
        steady.max_end += 1
        steady.plans_left -= 1
        run = DecodeRun(steady.rows, starts, ends, steady.max_end, steady.plans_left == 0, grown)
        return run, budget - len(starts)

    def _schedule_running(self, depth: int | None, preempted: list[Request], together: bool
                          ) -> tuple[list[ScheduledRequest], int] | None:
        """The running requests' rows, in admission order, and the token budget they leave.
        ``together``: rows that need new blocks get them in one take after the pass, or the pass
        returns None (the pool cannot give them all; nothing taken); else each row takes its own as
        it comes, and one that cannot grow evicts a victim (into ``preempted``)."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        growth: list[tuple[str, int]] = []  # (request id, tokens) of rows to grow together
        # This loop runs once per running request per step (host time on a GPU): locals, one read
        # of each field.
        i = 0
        running, capacity, blocks = self.running, self.blocks.capacity, self.blocks
        while i < len(running) and budget > 0:
            request = running[i]
            if depth is not None and request.exit_layer > depth:
                i += 1
                continue
            start, num_output = request.num_computed_tokens, len(request.output_token_ids)
            total = len(request.prompt_token_ids) + num_output
            n = total - start
            if n <= 0 or (num_output and num_output >= request.params.max_tokens):
                # Nothing left to compute (a scored prompt), or its last token is still being sampled
                # (an overlapped step): it finishes when that step is read.
                i += 1
                continue
            if n > budget:
                n = budget
            if start + n > capacity(request.request_id):
                # Most steps skip this: a decoding row needs a new block once every block_size tokens.
                if together:
                    growth.append((request.request_id, start + n))
                else:
                    while not blocks.try_grow(request.request_id, start + n):
                        victim = self._victim(running[i:])
                        self._preempt(victim)
                        preempted.append(victim)
                        if victim is request:
                            break
                    if request.status is not RequestStatus.RUNNING:
                        continue  # it preempted itself; the next request now sits at index i
            scheduled.append(ScheduledRequest(request, start, n, start + n == total))
            budget -= n
            i += 1
        if growth and not blocks.try_grow_all(growth):
            return None
        return scheduled, budget

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

    def follow_batch_order(self, order: list[int]) -> None:
        """The runner's batch holds the rows of the plan just launched in this order (order[b]:
        index into that plan's list of the request in row b). When that plan started a steady
        decode, its rows are listed in this order from the next plan on: every order with the
        deepest exit first is one the runner serves, and one it already holds lets it reuse the
        first step's lists at every later step (ModelRunner.prepare), where a listing that only
        differs within an exit group made it rebuild them each step (a mixed-depth batch, its rows
        admitted at different times)."""
        steady = self._steady
        if steady is None or steady.in_batch_order:
            return
        steady.in_batch_order = True
        if len(order) != len(steady.rows) or order == list(range(len(order))):
            return
        moved = np.asarray(order, dtype=np.int64)  # [B]
        steady.rows = [steady.rows[i] for i in order]
        steady.to_running = moved if steady.to_running is None else steady.to_running[moved]
        steady.ends, steady.capacity = steady.ends[moved], steady.capacity[moved]

    def on_step_done(self, output: SchedulerOutput, seconds: float = 0.0) -> None:
        """The runner has written this step's tokens into the cache; it took ``seconds``."""
        self.on_step_launched(output)
        self.on_step_timed(output, seconds)

    def on_step_launched(self, output: SchedulerOutput, batch_order: list[int] | None = None) -> None:
        """The step's tokens are (or, on a device still working, will be before any later step
        reads them) in the cache: the next schedule may build on them. ``batch_order``: the order
        the runner's batch holds the step's rows in (see follow_batch_order)."""
        if batch_order is not None:
            self.follow_batch_order(batch_order)
        run = output.decode_run
        if run is not None:  # a steady decode: one token each, all past their prompts
            for request, computed in zip(run.requests, run.ends.tolist()):
                request.num_computed_tokens = computed
            if self._some_waited:  # (a row waits only after a step that left it out)
                for request in run.requests:
                    request.waited_s = 0.0
                self._some_waited = False
            return
        for item in output.scheduled:
            request = item.request
            request.num_computed_tokens = item.start + item.num_tokens
            request.waited_s = 0.0
            if item.start < len(request.prompt_token_ids):  # prompt blocks may have filled: offer them
                self.blocks.cache_prefix(request.request_id, request.prompt_token_ids, request.num_computed_tokens)

    def on_step_timed(self, output: SchedulerOutput, seconds: float, later: SchedulerOutput | None = None) -> None:
        """The step took ``seconds``: the running requests it left out waited that long, unless they
        run in ``later``, a step launched since (an overlapped engine times a step after launching
        the next)."""
        if len(output.scheduled) < len(self.running):  # scheduled rows are running: some sat out
            ran = {item.request.request_id for item in output.scheduled}
            if later is not None:
                ran.update(item.request.request_id for item in later.scheduled)
            for request in self.running:
                if request.request_id not in ran:
                    request.waited_s += seconds
                    self._some_waited = True
