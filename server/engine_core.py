"""The engine's own process (``balcony serve --engine-process``): it builds the engine, then steps
it while requests are in flight and answers the HTTP process's messages between steps. The pipe's
protocol and the HTTP side: server/engine_process.py.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from balcony_runtime.errors import RequestError
from server.async_engine import GroupEntry, guarded_step, queue_group

log = logging.getLogger("balcony.engine")


@dataclass(frozen=True)
class EngineFacts:
    """What the HTTP process reads of the engine, sent once when it is ready."""

    tokenizer: Any
    vocab_size: int
    exits: tuple[int, ...]
    full_depth: int
    max_model_len: int
    identity: str
    evaluation: dict | None  # the adapters' recorded quality per exit (None: no trained adapters)
    step_cost: str  # the calibrated step cost, described


def run_engine_process(conn, build, config, parent: int) -> None:
    """The engine process: build the engine (``build(phases)``), calibrate it if its builder did
    not, then step it while requests are in flight, answering the HTTP process's messages between
    steps."""
    _exit_with_parent(parent)
    # Ctrl-C reaches the whole process group: the HTTP process drains and then stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    from server.serve import StartupPhases

    phases = StartupPhases()
    phases.state = _PhaseReporter(conn)
    try:
        engine = build(phases)
        router = engine.router or engine.calibrate()
        loaded = engine.loaded
        facts = EngineFacts(
            tokenizer=engine.tokenizer, vocab_size=engine.model.arch.vocab_size, exits=engine.exits,
            full_depth=engine.model.full_depth, max_model_len=loaded.max_model_len, identity=loaded.identity,
            evaluation=(loaded.adapters.evaluation or {}) if loaded.adapters else None,
            step_cost=router.model.step_cost.describe(engine.exits))
    except BaseException as exc:  # noqa: BLE001 - reported to the HTTP process, which exits 1
        log.exception("the engine failed to load")
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", facts))
    EngineLoop(engine, conn, config.max_queued_requests).run()


class _PhaseReporter:
    """StartupPhases.state in the engine process: each phase entered goes to the HTTP process."""

    def __init__(self, conn):
        self._conn = conn

    @property
    def phase(self) -> str:
        return ""

    @phase.setter
    def phase(self, name: str) -> None:
        self._conn.send(("phase", name))


class EngineLoop:
    """Steps the engine while requests are in flight; between steps, runs every message waiting."""

    def __init__(self, engine, conn, max_queued: int):
        import torch

        from balcony_runtime.cpu_threads import ThreadGovernor

        self.engine, self.conn, self.max_queued = engine, conn, max_queued
        # Its outputs go down the pipe as tuples (a steady decode's as columns); the HTTP process rebuilds them.
        engine.emit_rows()
        # Submissions whose schemas are being compiled (in order): compiling on this loop would
        # stall every stream for as long (a large schema, or llguidance's first vocabulary trie:
        # seconds), so a worker thread compiles and the submission is queued once it is done, as
        # the threaded server compiles before it queues (generation_group.compile_grammars).
        self._compiling: list[tuple[concurrent.futures.Future, tuple]] = []
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self.governor = None
        if engine.model.norm.device.type == "cpu":
            self.governor = ThreadGovernor(full=torch.get_num_threads())

    def run(self) -> None:
        # In inference mode for the loop's life: the runner's methods then skip entering it on
        # every call (balcony_runtime/inference_mode.py).
        import torch

        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        engine, conn = self.engine, self.conn
        threads = None
        try:
            while True:
                idle = not engine.has_unfinished()
                handled = self._handle_messages(wait=(0.01 if self._compiling else 0.1) if idle else 0)
                if handled is None:
                    return  # "stop"
                if self._compiling:
                    handled = self._submit_compiled() or handled
                if not engine.has_unfinished():
                    if handled:  # an abort or a refusal changed the queues: the gauges follow
                        conn.send(("outputs", [], self._gauges(threads)))
                    continue
                if self.governor is not None:
                    threads = self.governor.tick()
                outputs = guarded_step(engine, self._fail_all)
                if outputs is None:
                    continue
                conn.send(("outputs", outputs, self._gauges(threads)))  # rows of fields, or StepOutputs columns
        except (EOFError, OSError, ValueError):
            return  # the HTTP process is gone

    def _gauges(self, threads: int | None) -> tuple:
        engine = self.engine
        return engine.num_running, engine.num_waiting, engine.blocks.usage, threads

    def _handle_messages(self, wait: float) -> bool | None:
        """Run the messages waiting (waiting up to ``wait`` seconds for one): whether there were
        any; None on "stop"."""
        conn = self.conn
        if not conn.poll(wait):
            return False
        while True:
            message = conn.recv()
            kind = message[0]
            if kind == "stop":
                return None
            if kind == "submit":
                self._submit_when_compiled(message[1:])
            elif kind == "abort":
                self.engine.abort(message[1])
            if not conn.poll():
                return True

    def _submit_when_compiled(self, submission: tuple) -> None:
        grammars = self.engine.grammars
        entries: list[GroupEntry] = submission[1]
        missing = {e.params.structured for e in entries
                   if e.params.structured is not None and not grammars.has(e.params.structured)}
        if not missing and not self._compiling:
            self._submit(*submission)
            return
        if self._compiler is None:
            self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="balcony-grammar")
        # (one behind another compiling waits its turn, even without a schema: arrival order holds)
        self._compiling.append((self._compiler.submit(lambda: [grammars.matcher(c) for c in missing]), submission))

    def _submit_compiled(self) -> bool:
        """Queue the submissions whose schemas are compiled, in order; whether any was."""
        done = 0
        while done < len(self._compiling) and self._compiling[done][0].done():
            future, submission = self._compiling[done]
            error = future.exception()
            if error is not None:  # (the HTTP process compiled it first, so this is rare)
                self.conn.send(("refused", submission[0], _picklable(error)))
            else:
                self._submit(*submission)
            done += 1
        del self._compiling[:done]
        return done > 0

    def _submit(self, call: int, entries: list[GroupEntry], budget_ms, forced_exit, received) -> None:
        try:
            decisions = queue_group(self.engine, entries, budget_ms, forced_exit, received, self.max_queued)
        except Exception as exc:  # noqa: BLE001 - the HTTP request gets it as its error
            self.conn.send(("refused", call, _picklable(exc)))
            return
        self.conn.send(("submitted", call, decisions))

    def _fail_all(self, exc: Exception) -> None:
        engine = self.engine
        ids = engine.unfinished_request_ids()
        for rid in ids:
            engine.abort(rid)
        self.conn.send(("failed", ids, str(exc)))


def _picklable(exc: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RequestError or RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        kind = RequestError if isinstance(exc, RequestError) else RuntimeError
        return kind(str(exc) or type(exc).__name__)


def _exit_with_parent(parent: int) -> None:
    """Leave as soon as the HTTP process (pid ``parent``, passed rather than read here, in case it
    died before this ran) is gone, however it went (os._exit at a signal during start-up, a crash,
    SIGKILL). Serving, the pipe's end says so; loading and calibrating (up to minutes) read no
    pipe, so a thread watches for this process being handed to another parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="balcony-parent-watch", daemon=True).start()
