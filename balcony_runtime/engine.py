"""The engine: requests in, a step loop of schedule -> launch -> read -> post-process, outputs out.

Called from one thread. On CUDA a step is launched before the previous one is read, so the host's
work overlaps the device's (LLMEngine.step); on a CPU each step is read as soon as it is launched.
Free of HTTP concerns: the server wraps it in an async front (server/async_engine.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Iterable, Sequence

import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.detokenizer import IncrementalDetokenizer, token_texts
from balcony_runtime.errors import RequestError
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.loader import LoadedModel
from balcony_runtime.model_runner import ModelRunner, PendingStep, StepResult
from balcony_runtime.plain_outputs import PlainRun
from balcony_runtime.request import Request, RequestStatus
from balcony_runtime.request_output import CompletedRequest, RequestOutput, output_row, plain_output
from balcony_runtime.sampler import TokenLogprobs
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.routing.calibration import calibrate
from balcony_runtime.routing.latency_model import LatencyModel, LoadSnapshot, RowLoad
from balcony_runtime.routing.router import RouteDecision, Router
from balcony_runtime.routing.step_cost import StepShape
from balcony_runtime.scheduler import DecodeRun, ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from balcony_runtime.structured.token_masks import MaskFiller


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens per step; longer prompts are prefilled in chunks
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # blocks in the pool; None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: 2 GB on CPU, 90% of free memory on CUDA
    budget_policy: str = "best-effort"  # no exit meets a budget: "best-effort" (shallowest) or "reject"
    served_exits: tuple[int, ...] | None = None  # exits requests may use, routed or forced (None: every one)
    starvation_ratio: float = 2.0  # SchedulerConfig.starvation_ratio
    deadline_margin: float = 0.1  # SchedulerConfig.deadline_margin
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps
    cuda_graph_max_rows: int = 256  # decode steps of more rows (or max_num_seqs, if fewer) run eagerly
    prefix_caching: bool = True  # prompts' whole blocks are reused by later requests (prefix_cache.py)
    # Launch step N+1 before reading step N's tokens, so the host's work (schedule, prepare, the
    # outputs of step N) overlaps the device's. None: on for CUDA devices, off on a CPU, where the
    # forward runs on the calling thread and nothing would overlap.
    overlap_steps: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be positive")
        if self.served_exits is not None and not self.served_exits:
            raise ValueError("served_exits must name at least one exit")


def tokenize_prompt(tokenizer, vocab_size: int, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: a string encoded with the model's special tokens, or ids checked
    against the vocabulary."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    ids = list(prompt)
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    return ids


_request_of = attrgetter("request")


@dataclass(frozen=True)
class StepStats:
    """The shape and duration of one step: what the latency model learns from."""

    seconds: float  # wall time of schedule + forward + sampling
    shape: StepShape  # what the step ran, as the step-cost model sees it
    num_rows: int  # requests in the step
    deepest_exit: int  # the deepest exit among them (it sets how many layers run)
    num_prefill_tokens: int  # tokens of rows with more than one token this step
    depth_limit: int | None  # the scheduler ran only rows at or below this exit (None: no limit)

    @classmethod
    def of(cls, plan: SchedulerOutput, pending: PendingStep, seconds: float) -> "StepStats":
        """A launched step's stats: its shape as the runner measured it while preparing the step."""
        rows, layout, run = plan.scheduled, pending.layout, plan.decode_run
        # (a steady plan's rows are made when read: its requests give the deepest exit directly)
        deepest = run.requests[0].exit_layer if run is not None else rows[0].request.exit_layer
        return cls(seconds, layout.shape, len(rows), deepest, layout.num_prefill_tokens, plan.depth_limit)


@dataclass(slots=True)
class _Launched:
    """A step whose tokens the host has not read: its plan, and where each sampled row's
    placeholder sits in its request's output (None: the row samples nothing)."""

    plan: SchedulerOutput
    pending: PendingStep
    positions: list[int | None] | None  # None: no placeholders (the tokens are appended when read)
    started: float  # time.monotonic() when its step() began


@dataclass(slots=True)
class _Tracked:
    request: Request
    detok: IncrementalDetokenizer
    route: RouteDecision | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Tokens that end it: the end-of-sequence ids (unless ignored) and its stop_token_ids.
    stop_ids: frozenset[int] = field(init=False)
    # A plain request's token text, the detokenizer's stream method: no stop strings, logprobs,
    # prompt logprobs or grammar, and at least one token to generate. Its decode tokens that do not
    # end it take LLMEngine._postprocess's short path. None for any other request.
    plain_text: Callable[[int], str] | None = field(init=False)

    def __post_init__(self) -> None:
        request = self.request
        params = request.params
        self.stop_ids = request.eos_token_ids | frozenset(params.stop_token_ids)
        plain = (not params.stop and params.logprobs is None and params.prompt_logprobs is None
                 and request.grammar is None and params.max_tokens > 0)
        self.plain_text = self.detok.add if plain else None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        arch = self.model.arch
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(config)
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        # One block more than the manager hands out: the scratch block of CUDA-graph decode steps.
        kv = KVCache.allocate(arch, num_blocks + 1, config.block_size, self.model.dtype, self.model.norm.device)
        self.runner = ModelRunner(self.model, kv, self.blocks, scratch_block=num_blocks)
        self.graphs_recorded = 0
        if self.model.norm.device.type == "cuda" and not config.enforce_eager:
            graphs = self.runner.use_graphs(min(config.max_num_seqs, config.cuda_graph_max_rows),
                                            loaded.max_model_len, max_slots=config.max_num_seqs)
            self.graphs_recorded = graphs.recorded
        # Structured outputs: grammars compiled once per schema, masks filled while the model runs.
        # Imported here: llguidance's tokenizer bridge imports transformers (about a second), which a
        # server's start-up overlaps with reading the weights (loader.load_model's tokenizer thread).
        from balcony_runtime.structured.compiler import GrammarCompiler

        self.grammars = GrammarCompiler(self.tokenizer, arch.vocab_size)
        self.masks = MaskFiller(arch.vocab_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.starvation_ratio, config.deadline_margin),
            self.blocks,
        )
        self.router: Router | None = None  # set by calibrate(): budgets need it
        every = (*self.model.exits, self.model.full_depth)
        unknown = sorted(set(config.served_exits or ()) - set(every))
        if unknown:
            names = ", ".join([*(str(e) for e in self.model.exits), "full"])
            raise ValueError(f"exits {unknown} are not in this model; it has {names}")
        self._served = tuple(sorted(set(config.served_exits))) if config.served_exits else every
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.last_step: StepStats | None = None
        on_device = self.model.norm.device.type == "cuda"
        self.overlap_steps = on_device if config.overlap_steps is None else config.overlap_steps
        self._in_flight: _Launched | None = None  # an overlapped step not yet read back
        self._last_resolved = 0.0  # time.monotonic() when the last step's tokens were read
        self._num_needs_sync = 0  # tracked requests with Request.needs_sync
        self._output: Callable[..., RequestOutput | tuple] = RequestOutput  # what step() makes of each output (emit_rows)
        # A steady decode of plain requests gives its outputs as columns (plain_outputs.py; False:
        # always an output made per row, as before: benchmarks and tests compare the two).
        self.steady_columns = True
        self._released = 0  # requests finished or aborted so far (a PlainRun made before one is checked again)
        # The current steady decode's (requests, released, PlainRun or None: not every row plain).
        self._plain: tuple[list[Request] | None, int, PlainRun | None] = (None, 0, None)
        eos = self.tokenizer.eos_token_id
        self.token_texts = token_texts(self.tokenizer)  # shared by every request's detokenizer
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def _blocks_for_memory(self, config: EngineConfig) -> int:
        device = self.model.norm.device
        per_block = KVCache.bytes_per_block(self.model.arch, config.block_size, self.model.dtype)
        if config.kv_cache_memory_gb is not None:
            budget = config.kv_cache_memory_gb * 2**30
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = 0.9 * free
        else:
            budget = 2 * 2**30
        return max(1, int(budget // per_block) - 1)  # less the scratch block

    # ---- requests --------------------------------------------------------------------------

    @property
    def exits(self) -> tuple[int, ...]:
        """The exits this engine serves, shallow to deep (the full depth is the model's layer count):
        every balcony and the full model, or the operator's choice among them."""
        return self._served

    def exit_names(self) -> list[str]:
        full = self.model.full_depth
        return ["full" if e == full else str(e) for e in self.exits]

    def parse_exit(self, exit_layer: int | str | None) -> int:
        """A served exit from a layer count or 'full'; None is the deepest served exit."""
        if exit_layer is None:
            return self.exits[-1]
        value = self.model.full_depth if exit_layer == "full" else exit_layer
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = -1
        if value not in self.exits:
            raise RequestError(f"unknown exit {exit_layer!r}; this server serves exits {', '.join(self.exit_names())}")
        return value

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, self.model.arch.vocab_size, prompt)

    # ---- routing ---------------------------------------------------------------------------

    def calibrate(self, **kwargs) -> Router:
        """Measure step costs through this (idle) engine and start routing budgets and scheduling
        deadlines with them. ``kwargs`` go to :func:`routing.calibration.calibrate`."""
        if self.has_unfinished():
            raise RequestError("calibration needs an idle engine")
        step_cost = calibrate(self, **kwargs)
        latency = LatencyModel(step_cost, self.config.starvation_ratio, self.config.deadline_margin)
        self.router = Router(latency, self.exits, self.config.budget_policy)
        self.scheduler.step_cost = step_cost
        return self.router

    def route(self, prompt_tokens: int, max_tokens: int, budget_ms: float | None,
              forced_exit: int | None) -> RouteDecision | None:
        """The exit for a request arriving now (raises BudgetUnmeetable under the reject policy)."""
        if self.router is None:
            if budget_ms is not None:
                raise RequestError("latency budgets need a calibrated engine (LLMEngine.calibrate)")
            return None
        return self.router.route(budget_ms, prompt_tokens, max_tokens, self.load_snapshot(), forced_exit)

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams = SamplingParams(),
        exit_layer: int | str | None = None,
        request_id: str | None = None,
        budget_ms: float | None = None,
        arrival_time: float | None = None,
        prefix_leader: str | None = None,
    ) -> str:
        """Queue a request; raise RequestError if it can never be served as asked.

        ``exit_layer`` forces an exit; otherwise a ``budget_ms`` (end-to-end milliseconds from
        ``arrival_time``, default now) is routed to the deepest exit predicted to meet it, and the
        scheduler treats arrival + budget as the request's deadline. Neither: full depth.
        ``prefix_leader``: an unfinished request with the same prompt and exit (another choice of
        it): this one starts once that one's prompt is computed and reads it from the prefix cache.
        """
        if budget_ms is not None and not budget_ms > 0:
            raise RequestError(f"a latency budget must be a positive number of milliseconds, got {budget_ms}")
        forced = None if exit_layer is None else self.parse_exit(exit_layer)
        prompt_ids = self.tokenize(prompt)
        vocab = self.model.arch.vocab_size
        if any(token >= vocab for token, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.loaded.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}, "
                f"over the model's maximum length of {self.loaded.max_model_len}"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise RequestError(f"request id {request_id!r} is already in use")
        # A cache hit when the server compiled the schema ahead (raises InvalidGrammar otherwise).
        grammar = None if params.structured is None else self.grammars.new_state(params.structured)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        # What is left of the budget now (the caller may have spent some since it arrived).
        left_ms = None if budget_ms is None else budget_ms - 1000 * max(0.0, time.monotonic() - arrival)
        route = self.route(len(prompt_ids), params.max_tokens, left_ms, forced)
        if route is not None and budget_ms is not None:
            route = dataclasses.replace(route, budget_ms=budget_ms)
        exit_value = route.exit_layer if route is not None else (forced or self.exits[-1])
        cache_layers = tuple(self.model.cache_layers_of(exit_value))
        num_cache_layers = len(cache_layers)
        if not self.blocks.fits_at_all(num_cache_layers, total):
            raise RequestError(f"a request of {total} tokens does not fit in the KV cache even alone")
        leader = None
        if prefix_leader is not None and self.config.prefix_caching:
            tracked_leader = self._tracked.get(prefix_leader)
            if (tracked_leader is not None and tracked_leader.request.exit_layer == exit_value
                    and tracked_leader.request.prompt_token_ids == prompt_ids):
                leader = tracked_leader.request
        request = Request(
            request_id, prompt_ids, params, exit_value, num_cache_layers, arrival,
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            deadline=None if budget_ms is None else arrival + budget_ms / 1000,
            grammar=grammar, cache_layers=cache_layers, prefix_leader=leader,
            needs_sync=(grammar is not None or params.has_penalties or params.logprobs is not None
                        or params.prompt_logprobs is not None),
        )
        self._num_needs_sync += request.needs_sync
        self._tracked[request_id] = _Tracked(request, IncrementalDetokenizer(self.token_texts, params.stop), route)
        self.scheduler.add(request)
        return request_id

    def route_of(self, request_id: str) -> RouteDecision | None:
        """How an unfinished request's exit was chosen (None: unknown, or no router)."""
        tracked = self._tracked.get(request_id)
        return None if tracked is None else tracked.route

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks at once; False if it was unknown or already done."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return False
        self._num_needs_sync -= tracked.request.needs_sync
        self._released += 1
        self.scheduler.finish(tracked.request, "abort")
        self.runner.release(request_id)
        return True

    def unfinished_request_ids(self) -> list[str]:
        """The requests added and not finished or aborted."""
        return list(self._tracked)

    def has_unfinished(self) -> bool:
        """Requests are queued or running, or a launched step's tokens are still to be read."""
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def request_needs_prefill(self, request_id: str) -> bool:
        """True while the request is unfinished and no step has sampled its first token (an
        overlapped step may have sampled it without the host having read it yet)."""
        tracked = self._tracked.get(request_id)
        return tracked is not None and not tracked.request.output_token_ids

    def load_snapshot(self) -> LoadSnapshot:
        def row(r: Request) -> RowLoad:
            uncached = r.num_tokens - r.num_computed_tokens  # 1 for a decoding row: its last sample
            return RowLoad(r.exit_layer, r.num_tokens, r.num_remaining_steps, uncached if uncached > 1 else 0,
                           r.deadline)

        return LoadSnapshot(
            now=time.monotonic(),
            running=tuple(row(r) for r in self.scheduler.running),
            waiting=tuple(row(r) for r in self.scheduler.admission_order()),
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step loop ---------------------------------------------------------------------

    def step(self) -> Sequence[RequestOutput]:
        """Schedule and launch a step; return the outputs of every step whose tokens were read.

        Synchronous (the default on a CPU): the step's tokens are read at once and its outputs
        returned. Overlapped (``overlap_steps``, the default on CUDA; vLLM v1's async scheduling):
        step N+1 is scheduled and launched before step N's tokens are read, so the host's work
        runs while the device computes. The scheduler counts each token a launched step samples
        as known: the request's output holds a placeholder -1 - j for it (j: its row among the
        step's sampled tokens), the next step feeds the device's token in its place, and reading
        the step replaces it. Stops are therefore seen a step late: a request that stops at step N
        also ran in step N+1, whose token for it is dropped. A step with a request whose sampling
        needs its last token on the host (a grammar's mask, penalties) launches its forward, reads
        the step in flight while the device runs it, then samples."""
        now = time.monotonic()
        plan = self.scheduler.schedule(now)
        in_flight = self._in_flight
        if plan.is_empty:
            if in_flight is None:
                return []
            self._in_flight = None  # first: a step that fails to be read is not read again
            return self._resolve(in_flight, None)
        if not self.overlap_steps:
            self._prefetch_masks(plan)
            pending = self.runner.launch(plan.scheduled, None, plan.decode_run)
            self.scheduler.on_step_launched(plan, pending.layout.order)
            return self._resolve(_Launched(plan, pending, None, now), None)
        if in_flight is not None and self._num_needs_sync and any(item.request.needs_sync for item in plan.scheduled):
            # Some row's sampling needs the step in flight read first (its grammar's mask, its
            # penalties' counts): the forward goes ahead, the sampling waits for the read.
            forwarded = self.runner.forward(plan.scheduled, in_flight.pending.tokens, plan.decode_run)
            self.scheduler.on_step_launched(plan, forwarded.layout.order)
            self._in_flight = None
            outputs = self._resolve(in_flight, plan)
            self._prefetch_masks(plan)
            self._in_flight = self._placed(plan, self.runner.sample(forwarded, some_finished=True), now)
            return outputs
        self._prefetch_masks(plan)
        pending = self.runner.launch(plan.scheduled, None if in_flight is None else in_flight.pending.tokens,
                                     plan.decode_run)
        self.scheduler.on_step_launched(plan, pending.layout.order)
        self._in_flight = self._placed(plan, pending, now)
        return [] if in_flight is None else self._resolve(in_flight, plan)

    def emit_rows(self) -> None:
        """From now on step() gives each output as a plain tuple of RequestOutput's fields in order
        (``RequestOutput(*row)`` rebuilds it): for another process, which the tuples reach pickled
        (server/engine_core.py). Building each row's object here only to take it apart again was
        about a third of a microsecond per row per step, twice."""
        self._output = output_row

    def _prefetch_masks(self, plan: SchedulerOutput) -> None:
        """Start filling the grammar masks of the plan's sampled rows (structured/token_masks.py)."""
        if not self._num_needs_sync:  # no request with a grammar (each needs_sync): no pass over the rows
            return
        self.masks.prefetch([item.request.grammar for item in plan.scheduled if item.completes_sequence
                             and item.request.grammar is not None and not item.request.is_finished])

    def _placed(self, plan: SchedulerOutput, pending: PendingStep, now: float) -> _Launched:
        """A launched step whose sampled tokens hold their places in the requests' outputs as
        placeholders until it is read (requests finished meanwhile get none)."""
        scheduled, run = plan.scheduled, plan.decode_run
        requests = run.requests if run is not None else [item.request for item in scheduled]
        positions: list[int | None] = [None] * len(scheduled)
        for j, i in enumerate(pending.sampling):
            request = requests[i]
            if request.params.max_tokens and request.status is not RequestStatus.FINISHED:
                # (no placeholder for prompt scoring: nothing is generated)
                output_ids = request.output_token_ids
                positions[i] = len(output_ids)
                output_ids.append(-1 - j)
        return _Launched(plan, pending, positions, now)

    def _resolve(self, launched: _Launched, later: SchedulerOutput | None) -> Sequence[RequestOutput]:
        """Read a launched step's tokens and turn them into outputs; ``later``: the step launched
        since, if any."""
        result = launched.pending.result()
        done = time.monotonic()
        # The step's time on the critical path: from its launch, or from the previous step's read
        # when it was launched while that one was still running.
        seconds = done - max(launched.started, self._last_resolved)
        self._last_resolved = done
        plan = launched.plan
        self.scheduler.on_step_timed(plan, seconds, later)
        self.last_step = StepStats.of(plan, launched.pending, seconds)
        if self.router is not None:
            self.router.model.step_cost.observe(self.last_step.shape, seconds)
        return self._postprocess(plan, result, launched.positions)

    def _postprocess(self, plan: SchedulerOutput, result: StepResult, positions: list[int | None] | None
                     ) -> Sequence[RequestOutput]:
        """``positions[i]``: where row i's placeholder sits in its request's output (None: the
        tokens are appended)."""
        # Runs once per row per step: a running request's decode token goes through here. A steady
        # decode of plain requests none of which ends gives its outputs as columns (PlainRun).
        # Otherwise, a plain request's token that does not end it takes the short path: its token
        # placed, its text, its output; anything else takes _row_output, the whole path.
        scheduled, run = plan.scheduled, plan.decode_run
        if run is not None and self.steady_columns:
            plain = self._plain_run(run)
            if plain is not None:
                outputs = plain.outputs(run, result.tokens, positions, self._output)
                if outputs is not None:
                    return outputs
        now = time.monotonic()
        outputs = []
        append, tracked_of, make_output = outputs.append, self._tracked, self._output
        # (a steady plan's requests from its DecodeRun: its rows are made only when read)
        requests = run.requests if run is not None else map(_request_of, scheduled)
        for i, (request, token) in enumerate(zip(requests, result.tokens)):
            tracked = tracked_of.get(request.request_id)
            if tracked is None:
                continue  # finished or aborted after this step was launched: its token is dropped
            text_of = tracked.plain_text
            # (a plain request asks for no logprobs: the step has none for it)
            if text_of is not None and token is not None and request.first_token_time is not None:
                output_ids = request.output_token_ids
                position = len(output_ids) if positions is None else positions[i]
                if position + 1 < request.params.max_tokens and token not in tracked.stop_ids:
                    if positions is None:
                        output_ids.append(token)
                    else:
                        output_ids[position] = token  # its placeholder
                    append(plain_output(
                        make_output, request.request_id, request.exit_layer, token, text_of(token),
                        len(request.prompt_token_ids), position + 1, request.arrival_time,
                        request.first_scheduled_time, request.first_token_time, request.num_cached_tokens))
                    continue
            append(self._row_output(i, scheduled[i], token, tracked, result, positions, now))
        return outputs

    def _plain_run(self, run: DecodeRun) -> PlainRun | None:
        """The steady decode's PlainRun, made at its first step (and again after a request left
        the engine: one of its rows may be gone); None when not every row is plain."""
        requests, released, plain = self._plain
        if requests is not run.requests or released != self._released:
            if any(r.first_token_time is None for r in run.requests):
                return None  # a row still to give its first token (the whole path's): tried again next step
            plain = PlainRun.of(run.requests, self._tracked)
            self._plain = run.requests, self._released, plain
        return plain

    def _row_output(self, i: int, item: ScheduledRequest, token: int | None, tracked: _Tracked, result: StepResult,
                    positions: list[int | None] | None, now: float) -> RequestOutput | tuple:
        """Row i's output, by the whole path: first tokens, prompt and token logprobs, grammars,
        stop strings, finishes."""
        request = item.request
        params = request.params
        step_logprobs, step_prompt_logprobs = result.logprobs, result.prompt_logprobs
        if step_prompt_logprobs and i in step_prompt_logprobs:
            tracked.prompt_logprobs.extend(step_prompt_logprobs[i])
        prompt_ready = False
        if params.prompt_logprobs is not None and not request.prompt_logprobs_done:
            if item.start + item.num_tokens >= request.num_prompt_tokens:
                request.prompt_logprobs_done = prompt_ready = True
        # (an empty tuple, not a new list, where a row has nothing: most rows have no logprobs)
        new_ids = new_logprobs = ()
        new_text, reason = "", None
        if token is None or params.max_tokens == 0:
            num_output = len(request.output_token_ids)  # this step's own token last, once placed
            if token is not None:
                reason = "length"  # prompt scoring only: nothing is generated
        else:
            output_ids = request.output_token_ids
            if positions is None:
                position = len(output_ids)
                output_ids.append(token)
            else:
                position = positions[i]
                output_ids[position] = token  # its placeholder
            num_output = position + 1  # a later step's placeholder may follow it
            if request.first_token_time is None:
                request.first_token_time = now
            new_ids = [token]
            if step_logprobs is not None and step_logprobs[i] is not None:
                new_logprobs = [step_logprobs[i]]
            if token in tracked.stop_ids:
                reason = "stop"
            elif position + 1 >= params.max_tokens:
                reason = "length"
            if request.grammar is not None and request.grammar.accept(token):
                reason = "stop"  # the JSON is complete: only the end of sequence could follow
            detok = tracked.detok
            is_special_stop = reason == "stop" and not detok.stopped
            new_text = detok.add(token, final=reason is not None)
            if detok.stopped:
                reason = "stop"
            elif is_special_stop:
                new_text += detok.flush()
        latency_s = budget_met = route = None
        if reason is not None:
            position = None if positions is None else positions[i]
            if position is not None and len(request.output_token_ids) > position + 1:
                del request.output_token_ids[position + 1 :]  # a later step's placeholder
            self.scheduler.finish(request, reason)
            self._tracked.pop(request.request_id)
            self._released += 1
            self._num_needs_sync -= request.needs_sync
            self.runner.release(request.request_id)
            latency_s = now - request.arrival_time
            if request.deadline is not None:
                budget_met = now <= request.deadline
            route = tracked.route
            if route is not None and self.router is not None:
                self.router.model.observe_request(route.expected_ms / 1000, latency_s, route.batch_rows)
        # Positional, in the field order of RequestOutput (17 keyword arguments were a measurable
        # share of a row's host time):
        # request_id, exit_layer, new_token_ids, new_text, new_logprobs, prompt_logprobs,
        # num_prompt_tokens, num_output_tokens, finished, finish_reason, arrival_time,
        # first_scheduled_time, first_token_time, route, latency_s, budget_met, num_cached_tokens.
        return self._output(
            request.request_id, request.exit_layer, new_ids, new_text, new_logprobs,
            tracked.prompt_logprobs if prompt_ready else None,
            len(request.prompt_token_ids), num_output, reason is not None, reason,
            request.arrival_time, request.first_scheduled_time, request.first_token_time,
            route, latency_s, budget_met, request.num_cached_tokens,
        )

    # ---- convenience -----------------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[str | Sequence[int]],
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        exit_layer: int | str | None | list[int | str | None] = None,
        budget_ms: float | None = None,
    ) -> list[CompletedRequest]:
        """Run prompts to completion together (continuous batching) and return them in order.

        ``params`` and ``exit_layer`` are one for all prompts, or a list with one per prompt."""
        prompts = list(prompts)
        each_params = params if isinstance(params, list) else [params] * len(prompts)
        each_exit = exit_layer if isinstance(exit_layer, list) else [exit_layer] * len(prompts)
        if not len(each_params) == len(each_exit) == len(prompts):
            raise ValueError("per-prompt params and exits must have one entry per prompt")
        ids = [self.add_request(p, sp, e, budget_ms=budget_ms) for p, sp, e in zip(prompts, each_params, each_exit)]
        done: dict[str, CompletedRequest] = {rid: CompletedRequest(rid) for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in done:
                    done[out.request_id].absorb(out)
        return [done[rid] for rid in ids]
