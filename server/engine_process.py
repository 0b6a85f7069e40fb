"""The step loop in a process of its own (``balcony serve --engine-process``).

In one process, the event loop (HTTP, SSE, metrics) and the step loop share the interpreter lock,
so their Python runs one at a time: with hundreds of streams the server used one core of two while
each step waited for the lock (docs/benchmarks.md). Here, as in vLLM v1's engine core, a child
process owns the engine (model, KV cache, scheduler, router) and runs steps back to back; the HTTP
process keeps what the endpoints read (tokenizer, exits, grammar checks) and the token streams.

The two talk over one pipe, in order:

    HTTP process -> engine:  ("submit", call, entries, budget_ms, forced_exit, received)
                             ("abort", request_id)    ("stop",)
    engine -> HTTP process:  ("phase", name)          start-up progress, for /ready
                             ("ready", EngineFacts)   or ("load_failed", message)
                             ("submitted", call, decisions) or ("refused", call, error)
                             ("outputs", rows, gauges) one message per step
                             ("failed", request_ids, message)  a step raised

A step's outputs travel as plain tuples (RequestOutput's fields; the route only on a finished
one): pickling 256 dataclass objects cost more than half a step. A steady decode of plain requests
travels as columns (request_output.StepOutputs), made into RequestOutputs here. Submissions are answered before
any step that could produce their tokens, and the HTTP process registers a request's stream when
the answer arrives, before it reads anything later from the pipe: no output can come to a stream
that does not exist yet. Times are time.monotonic(), one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from balcony_runtime.engine import tokenize_prompt
from balcony_runtime.request_output import RequestOutput, StepOutputs
from server.async_engine import AsyncEngine, Draining, EngineFailed, GroupEntry, Submission, _Stream
from server.engine_core import EngineFacts, run_engine_process
from server.metrics import ServerMetrics

log = logging.getLogger("balcony.engine")

class EngineView:
    """The engine as the endpoints see it (LLMEngine's attributes they read), in the HTTP process."""

    def __init__(self, facts: EngineFacts):
        from balcony_runtime.structured.compiler import GrammarCompiler

        self.facts = facts
        self.tokenizer = facts.tokenizer
        self.exits = facts.exits
        self.model = _ModelFacts(facts.full_depth)
        self.loaded = _LoadedFacts(facts.max_model_len, facts.identity,
                                   None if facts.evaluation is None else _AdapterFacts(facts.evaluation))
        # Schemas are compiled here too, in a worker thread before a request is queued, so that an
        # invalid one is a 400 without a round trip (the engine compiles its own copy when queued).
        self.grammars = GrammarCompiler(facts.tokenizer, facts.vocab_size)

    def tokenize(self, prompt) -> list[int]:
        return tokenize_prompt(self.tokenizer, self.facts.vocab_size, prompt)

    def exit_names(self) -> list[str]:
        return ["full" if e == self.model.full_depth else str(e) for e in self.exits]


@dataclass(frozen=True)
class _ModelFacts:
    full_depth: int


@dataclass(frozen=True)
class _AdapterFacts:
    evaluation: dict


@dataclass(frozen=True)
class _LoadedFacts:
    max_model_len: int
    identity: str
    adapters: _AdapterFacts | None


# ---- the HTTP process's side -----------------------------------------------------------------


class EngineProcess(AsyncEngine):
    """AsyncEngine's interface (submit_group, stream, abort, start, stop) over an engine in a child
    process; streams, metrics and dispatch are AsyncEngine's own."""

    def __init__(self, process: multiprocessing.Process, conn, facts: EngineFacts, metrics: ServerMetrics,
                 max_queued: int, on_engine_exit=None):
        # (not AsyncEngine.__init__: no engine object, no thread governor here)
        self.engine = EngineView(facts)
        self.metrics = metrics
        self.max_queued = max_queued
        self.governor = None
        self.draining = False
        self._streams: dict[str, _Stream] = {}
        self._process, self._conn = process, conn
        # Messages to the engine go through a thread: a send blocks while the pipe is full, and
        # the pipe fills when the engine is itself blocked sending outputs that the event loop
        # has not read yet. The event loop must keep reading, so it never sends itself.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="balcony-engine-pipe", daemon=True)
        self._writer.start()
        self._calls: dict[int, tuple[asyncio.Future, list[GroupEntry], float]] = {}  # submissions unanswered
        self._next_call = 0
        self._dead: str | None = None  # why the engine process is gone
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_engine_exit = on_engine_exit  # (reason) -> None, on the event loop, unless draining

    @classmethod
    def launch(cls, build, config, metrics: ServerMetrics, on_phase, on_engine_exit=None) -> "EngineProcess":
        """Start the engine process and wait until its engine is ready (runs in the loading thread).
        ``build(phases)``: makes the engine, in the engine process (so it must pickle: a module-level
        function or a partial of one; `balcony serve` passes serve.build_engine's). ``on_phase(name)``:
        the start-up phase the engine process entered; ``on_engine_exit(reason)``: called on the event
        loop if the engine process ends while serving (a crash, an OOM kill)."""
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and torch
        parent, child = context.Pipe()
        process = context.Process(target=run_engine_process, args=(child, build, config, os.getpid()),
                                  name="balcony-engine", daemon=True)
        process.start()
        child.close()
        while True:
            try:
                message = parent.recv()
            except EOFError:
                process.join(5)
                raise RuntimeError(f"the engine process exited during start-up (status {process.exitcode})") from None
            kind = message[0]
            if kind == "phase":
                on_phase(message[1])
            elif kind == "load_failed":
                process.join(10)
                raise RuntimeError(message[1])
            elif kind == "ready":
                facts = message[1]
                log.info("engine process %d ready; predicted decode step of one row: %s", process.pid,
                         facts.step_cost)
                return cls(process, parent, facts, metrics, config.max_queued_requests, on_engine_exit)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the pipe on the event loop: every message waiting is handled in one callback, so
        when the engine runs ahead, the streams' queues fill with several steps' outputs before
        their writers run (one write each), and no thread hands the interpreter lock back and
        forth per message."""
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._receive)

    def stop(self) -> None:
        self._stopping = True  # the engine's exit that follows is not a failure
        self._outbox.put(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    # ---- requests --------------------------------------------------------------------------

    async def submit_group(self, entries: list[GroupEntry], budget_ms: float | None, forced_exit: int | None,
                           received: float) -> list[Submission]:
        if self.draining:
            raise Draining("the server is shutting down")
        if self._dead is not None:
            raise EngineFailed(self._dead)
        future = self._loop.create_future()
        call, self._next_call = self._next_call, self._next_call + 1
        self._calls[call] = (future, entries, received)
        self._send(("submit", call, entries, budget_ms, forced_exit, received))
        return await future

    def _abort_in_engine(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message) -> None:
        if self._dead is None:
            self._outbox.put(message)

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the engine process is gone: _receive reports it
                return
            if message[0] == "stop":
                return

    # ---- from the engine process (on the event loop) ---------------------------------------

    def _receive(self) -> None:
        conn = self._conn
        try:
            while conn.poll():  # (a message is written whole: recv does not wait for long)
                message = conn.recv()
                kind = message[0]
                if kind == "outputs":
                    self._outputs(message[1], message[2], time.monotonic())
                elif kind == "submitted":
                    self._submitted(message[1], message[2])
                elif kind == "refused":
                    self._refused(message[1], message[2])
                elif kind == "failed":
                    self._failed(message[1], message[2])
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            self._engine_gone()

    def _submitted(self, call: int, decisions) -> None:
        """The engine queued a group: its streams exist from now on, before any later message."""
        future, entries, received = self._calls.pop(call)
        submissions = [self._open_stream(entry.request_id, decision, received, len(entry.prompt_ids))
                       for entry, decision in zip(entries, decisions)]
        if future.cancelled():  # its HTTP request went away meanwhile
            for s in submissions:
                self.abort(s.request_id)
            return
        future.set_result(submissions)

    def _refused(self, call: int, error: BaseException) -> None:
        future, _, _ = self._calls.pop(call)
        if not future.cancelled():
            future.set_exception(error)

    def _outputs(self, rows: list[tuple] | StepOutputs, gauges: tuple, now: float) -> None:
        running, waiting, kv_usage, cpu_threads = gauges
        m = self.metrics
        m.running.set(running)
        m.waiting.set(waiting)
        m.kv_usage.set(kv_usage)
        if cpu_threads is not None:
            m.cpu_threads.set(cpu_threads)
        self._dispatch(request_outputs(rows), now)

    def _update_gauges(self) -> None:
        pass  # the engine process sends its gauges with each step's outputs

    def _failed(self, request_ids: list[str], message: str) -> None:
        streams = [self._streams.pop(rid, None) for rid in request_ids]
        self._fail_streams([s for s in streams if s is not None], message)

    def _engine_gone(self) -> None:
        if self._dead is not None:
            return
        self._dead = f"the engine process exited (status {self._process.exitcode})"
        if self._stopping:
            return
        if not self.draining:
            log.error("%s; failing the %d requests in flight", self._dead, len(self._streams))
        self._failed(list(self._streams), self._dead)
        if not self.draining and self._on_engine_exit is not None:
            self._on_engine_exit(self._dead)
        for future, _, _ in self._calls.values():
            if not future.cancelled():
                future.set_exception(EngineFailed(self._dead))
        self._calls.clear()


def request_outputs(rows: list[tuple] | StepOutputs) -> Sequence[RequestOutput]:
    """A step's outputs as the engine process sent them (LLMEngine.emit_rows), as RequestOutputs."""
    if isinstance(rows, StepOutputs):  # a steady decode's columns: each row made once, straight from them
        return StepOutputs(rows.columns, rows.tokens, rows.texts, rows.num_output_tokens)
    return [RequestOutput(*row) for row in rows]
