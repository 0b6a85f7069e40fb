"""The async front of the engine: one step loop in a thread, token streams to asyncio.

Only the step-loop thread touches the engine. The event loop sends it commands (submit, abort)
through a queue that the loop drains between steps, so a step never starves a submission (a lock
would: the loop re-takes it at once) and the event loop never waits on a running step. Outputs
travel back to each request's asyncio.Queue. A client that goes away (its generator is closed) is
aborted at the next step boundary and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

import torch

from balcony_runtime.cpu_threads import ThreadGovernor
from balcony_runtime.engine import LLMEngine
from balcony_runtime.request_output import RequestOutput
from balcony_runtime.errors import BalconyError
from balcony_runtime.routing.router import RouteDecision
from balcony_runtime.sampling_params import SamplingParams
from server.metrics import ExitSeries, ServerMetrics
from server.output_stream import OutputStream
from server.routing_headers import exit_name

log = logging.getLogger("balcony.engine")


def guarded_step(engine: LLMEngine, fail_all: Callable[[Exception], None]) -> Sequence[RequestOutput] | None:
    """One engine step. A step that raises (a bug, a device error) is logged and handed to
    ``fail_all``, which fails the requests in flight, and None is returned: serving goes on."""
    try:
        return engine.step()
    except Exception as exc:
        log.exception("engine step failed")
        fail_all(exc)
        return None


def queue_group(engine: LLMEngine, entries: list["GroupEntry"], budget_ms: float | None, forced_exit: int | None,
                received: float, max_queued: int) -> list[RouteDecision]:
    """Add one HTTP request's engine requests, on the thread (or in the process) that steps the
    engine: the first is routed (budget or ``forced_exit``), the others run at the exit it got. All
    or none: on an error the ones added are aborted and it is raised."""
    added: list[str] = []
    decisions: list[RouteDecision] = []
    try:
        for entry in entries:
            if engine.num_waiting >= max_queued:
                raise QueueFull(f"{engine.num_waiting} requests are already waiting")
            forced = forced_exit if not decisions else decisions[0].exit_layer
            engine.add_request(entry.prompt_ids, entry.params, forced, entry.request_id, budget_ms=budget_ms,
                               arrival_time=received, prefix_leader=entry.prefix_leader)
            added.append(entry.request_id)
            decisions.append(engine.route_of(entry.request_id))
    except BaseException:
        for request_id in added:
            engine.abort(request_id)
        raise
    return decisions


class QueueFull(BalconyError):
    """More requests are waiting than the server accepts."""


class Draining(BalconyError):
    """The server is shutting down and admits no new requests."""


class EngineFailed(BalconyError):
    """A step raised: the requests in flight could not be completed."""


@dataclass
class _Stream:
    queue: OutputStream
    decision: RouteDecision
    received: float  # time.monotonic() when the HTTP request arrived
    num_prompt_tokens: int
    last_token_time: float | None = None
    num_tokens: int = 0
    exit_label: str = ""
    series: ExitSeries | None = None  # the metrics labelled with exit_label


@dataclass(frozen=True)
class GroupEntry:
    """One request of a group (submit_group)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefix_leader: str | None = None  # an earlier entry with the same prompt: its prompt blocks are shared


@dataclass(frozen=True)
class Submission:
    """A queued request: its id, how it was routed, and where its outputs arrive."""

    request_id: str
    decision: RouteDecision
    stream: _Stream


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_queued: int):
        self.engine = engine
        self.metrics = metrics
        self.max_queued = max_queued
        # CPU steps: the OpenMP team narrows while other processes hold cores (cpu_threads.py).
        self.governor = None
        if engine.model.norm.device.type == "cpu":
            self.governor = ThreadGovernor(full=torch.get_num_threads())
            metrics.cpu_threads.set(self.governor.threads)
        # (command, future or None): run by the step loop between steps.
        self._commands: queue.SimpleQueue[tuple[Callable, concurrent.futures.Future | None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="balcony-step-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, None))  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def exit_label(self, exit_layer: int) -> str:
        return exit_name(exit_layer, self.engine.model.full_depth)

    # ---- requests --------------------------------------------------------------------------

    async def submit_group(self, entries: list["GroupEntry"], budget_ms: float | None, forced_exit: int | None,
                           received: float) -> list["Submission"]:
        """Route and queue the requests of one HTTP request in one command, so they enter the same
        step: the first is routed (budget or ``forced_exit``), the others run at the exit it got.
        All or none: on an error the ones queued are aborted and it is raised."""
        if self.draining:
            raise Draining("the server is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((lambda: self._submit_group_now(entries, budget_ms, forced_exit, received), future))
        return await asyncio.wrap_future(future)

    def _submit_group_now(self, entries, budget_ms, forced_exit, received) -> list["Submission"]:
        """Runs on the step loop: no output can arrive before the streams exist."""
        try:
            decisions = queue_group(self.engine, entries, budget_ms, forced_exit, received, self.max_queued)
        finally:
            self._update_gauges()
        return [self._open_stream(entry.request_id, decision, received, len(entry.prompt_ids))
                for entry, decision in zip(entries, decisions)]

    def _open_stream(self, request_id: str, decision: RouteDecision, received: float,
                     num_prompt_tokens: int) -> "Submission":
        """Register a queued request's stream: its outputs are dispatched to it from now on."""
        label = self.exit_label(decision.exit_layer)
        stream = _Stream(OutputStream(), decision, received, num_prompt_tokens, exit_label=label,
                         series=self.metrics.of_exit(label))
        self._streams[request_id] = stream
        return Submission(request_id, decision, stream)

    async def stream(self, submission: "Submission") -> AsyncIterator[list[RequestOutput]]:
        """Outputs of a submitted request until it finishes, in lists of those that arrived
        together; closing early aborts it.

        Every output waiting when the reader wakes comes in one list: when the step loop runs ahead
        of the event loop (many streams), a stream's tokens of several steps go out in one socket
        write (see stream_completion), where a write per token was half the event loop's time.
        Reads the queue the submission holds: the request may finish (and leave ``_streams``)
        before its reader starts, and its outputs must still arrive.
        """
        request_id, waiting = submission.request_id, submission.stream.queue
        finished = False
        try:
            while True:
                batch = []
                for item in await waiting.take_all():
                    if isinstance(item, Exception):
                        if batch:
                            yield batch  # what came before the error is still sent
                        raise item
                    batch.append(item)
                    if item.finished:
                        break  # (nothing follows a finished output)
                finished = batch[-1].finished
                yield batch
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request still in flight: freed at the next step boundary, without waiting here."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # finished, failed or already aborted
        self.metrics.request_success.labels(stream.exit_label, "abort").inc()
        self._abort_in_engine(request_id)

    def _abort_in_engine(self, request_id: str) -> None:
        self._commands.put((lambda: self.engine.abort(request_id), None))

    # ---- the step loop (its own thread) ----------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        # In inference mode for the loop's life: the runner's methods then skip entering it on
        # every call (balcony_runtime/inference_mode.py).
        with torch.inference_mode():
            while not self._stop.is_set():
                self._run_commands(block=not engine.has_unfinished())
                if not engine.has_unfinished():
                    continue
                if self.governor is not None:
                    self.metrics.cpu_threads.set(self.governor.tick())
                outputs = guarded_step(engine, self._fail_all)
                if outputs is None:
                    continue
                self._update_gauges()  # blocks and queues changed with the step, outputs or not
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, time.monotonic())

    def _run_commands(self, block: bool) -> None:
        try:
            command, future = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                result = command()
            except BaseException as exc:
                if future is not None:
                    future.set_exception(exc)
                else:
                    log.exception("engine command failed")
            else:
                if future is not None:
                    future.set_result(result)
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                break
        self._update_gauges()

    def _fail_all(self, exc: Exception) -> None:
        """Runs on the step loop: abort everything in flight and tell each waiting client."""
        failed = list(self._streams.items())
        self._streams.clear()
        for request_id, _ in failed:
            self.engine.abort(request_id)
        self._loop.call_soon_threadsafe(self._fail_streams, [stream for _, stream in failed], str(exc))
        self._update_gauges()

    def _fail_streams(self, streams: list[_Stream], reason: str) -> None:
        """On the event loop: each of these streams ends with an EngineFailed (its client gets an
        error event, or a 500), counted as aborted."""
        error = EngineFailed(f"the engine failed while serving this request: {reason}")
        for stream in streams:
            stream.queue.put(error)
            self.metrics.request_success.labels(stream.exit_label, "abort").inc()

    def _dispatch(self, outputs: Sequence[RequestOutput], now: float) -> None:
        m = self.metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            label, series = stream.exit_label, stream.series
            if out.new_token_ids:
                if stream.last_token_time is None:
                    series.ttft.observe(now - stream.received)
                else:
                    series.itl.observe(now - stream.last_token_time)
                stream.last_token_time = now
                stream.num_tokens += len(out.new_token_ids)
            if out.finished:
                self._streams.pop(out.request_id, None)
                seconds = now - stream.received
                series.e2e.observe(seconds)
                queued = (out.first_scheduled_time or now) - out.arrival_time
                series.queue_time.observe(max(0.0, queued))
                series.prompt_tokens.inc(out.num_prompt_tokens)
                series.generation_tokens.inc(out.num_output_tokens)
                m.request_success.labels(label, out.finish_reason).inc()
                decision = stream.decision
                series.prediction_error.observe(abs(seconds - decision.predicted_ms / 1000))
                # Judged by the engine against arrival + budget, arrival being when HTTP received it.
                outcome = {None: "none", True: "hit", False: "miss"}[out.budget_met]
                m.budget_requests.labels(label, outcome).inc()
            stream.queue.put(out)
        self._update_gauges()

    def _update_gauges(self) -> None:
        engine = self.engine
        self.metrics.running.set(engine.num_running)
        self.metrics.waiting.set(engine.num_waiting)
        self.metrics.kv_usage.set(engine.blocks.usage)

