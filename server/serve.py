"""``balcony serve``: uvicorn, a start-up that says what it does, and a prompt, graceful SIGTERM.

Start-up runs in a worker thread once the server listens, in phases: download and conversion (the
first time only), load, warm-up, calibration (read back from $BALCONY_HOME/calibration on later
starts). Each phase logs a line when it begins and is kept on the server state (``state.phase``)
for /ready; a last line gives each phase's seconds.

On SIGTERM (or Ctrl-C) while serving, the server stops admitting requests (/ready and new requests
answer 503), lets the requests in flight finish for up to ``--shutdown-timeout`` seconds, then exits
0; a second signal exits at once. A signal during start-up exits at once with status 0: the
loading thread cannot be interrupted (a pip download, a conversion, torch ops), and nothing is
served yet, so there is nothing to wait for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NoReturn

import uvicorn

from server.sampling_defaults import describe as describe_sampling_defaults
from server.serve_options import ENGINE_PROCESS_MODES, ServeConfig, parse_exit_list

log = logging.getLogger("balcony.server")


@dataclass
class StartupPhases:
    """The start-up phase running now and the seconds each one took.

    The loading thread moves it on; the event loop reads it (/ready, a signal): each is one
    attribute assignment or read, atomic under the GIL.
    """

    started: float = field(default_factory=time.monotonic)  # when serve() began
    current: str = "starting"  # imports and the HTTP server's own start
    seconds: dict[str, float] = field(default_factory=dict)  # finished phases, in order
    state: object | None = None  # the app's ServerState, whose ``phase`` /ready reports
    _since: float = field(default_factory=time.monotonic)

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self.current, self._since = phase, now
        if self.state is not None:
            self.state.phase = phase

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        spent = {**self.seconds, self.current: self.seconds.get(self.current, 0.0) + time.monotonic() - self._since}
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in spent.items())


def exit_now(message: str, *args, level: int = logging.INFO) -> NoReturn:
    """Log one line and leave with status 0 without waiting for any thread (loading, step loop)."""
    log.log(level, message, *args)
    logging.shutdown()  # flush: os._exit skips it
    os._exit(0)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float, phases: StartupPhases):
        super().__init__(config)
        self.balcony_state = state
        self.shutdown_timeout = shutdown_timeout
        self.phases = phases
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        state, name = self.balcony_state, signal.Signals(sig).name
        if state.load_error is not None:
            return super().handle_exit(sig, frame)  # a failed load is already shutting the server down
        if state.engine is None:
            exit_now("%s during start-up (phase %s, %.1f s in): exiting; nothing was being served",
                     name, self.phases.current, self.phases.elapsed())
        if state.draining or self._drain_task is not None:
            exit_now("second %s: exiting now, abandoning %d requests in flight", name, state.engine.num_in_flight,
                     level=logging.WARNING)
        state.draining = True
        state.engine.draining = True
        log.info("%s: draining %d requests in flight for up to %.0f s, then exiting (a second %s exits at once)",
                 name, state.engine.num_in_flight, self.shutdown_timeout, name)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        engine = self.balcony_state.engine
        while engine is not None and engine.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def engine_process_by_default(device: str) -> bool:
    """--engine-process auto (the default): on where the model runs on a GPU (ServeConfig.engine_process
    says why)."""
    from balcony_runtime.loader import resolve_device

    return resolve_device(device).type == "cuda"


def serve(args) -> int:
    """Run the server until it is stopped; exits the process (status 0, or 1 if the model failed to
    load) instead of returning, except for invalid options (returns 2)."""
    phases = StartupPhases()
    try:
        config = ServeConfig(
            host=args.host, port=args.port, api_key=args.api_key or None, max_num_seqs=args.max_num_seqs,
            max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
            budget_policy=args.budget_policy, exits=args.exits, starvation_ratio=args.starvation_ratio,
            served_model_name=args.served_model_name, tool_call_parser=args.tool_call_parser,
            prefix_caching=args.prefix_caching, overlap_steps=args.overlap_steps,
            recalibrate=args.recalibrate, log_level=args.log_level, event_loop=args.event_loop,
            engine_process=ENGINE_PROCESS_MODES[args.engine_process], sampling_defaults=args.sampling_defaults,
        )
    except ValueError as exc:
        print(f"balcony serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def before_uvicorn(sig, frame) -> None:
        exit_now("%s during start-up (phase %s, %.1f s in): exiting; nothing was being served",
                 signal.Signals(sig).name, phases.current, phases.elapsed())

    # Until uvicorn takes the signals over: importing the app (torch) takes seconds.
    signal.signal(signal.SIGTERM, before_uvicorn)
    signal.signal(signal.SIGINT, before_uvicorn)
    log.info("starting: loading the model in the background once the server listens on %s:%d "
             "(/health answers at once, /ready once the model is ready)", config.host, config.port)
    if config.sampling_defaults:
        log.info("requests that leave them out get %s (--override-generation-config)",
                 describe_sampling_defaults(config.sampling_defaults))

    from server.app import create_app  # torch and the runtime: the slow imports

    if config.engine_process is None:
        config = replace(config, engine_process=engine_process_by_default(args.device))

    failed: list[BaseException] = []
    engine_died: list[str] = []  # --engine-process: why the engine's process ended while serving

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True  # a server that cannot load exits non-zero, so it is restarted

    start_engine = None
    if config.engine_process:
        from server.engine_process import EngineProcess

        def on_engine_exit(reason: str) -> None:
            engine_died.append(reason)
            server.should_exit = True  # a server without its engine exits non-zero, so it is restarted

        def start_engine(state):  # runs in the loading thread; the engine is built in its process
            return EngineProcess.launch(partial(build_engine, args, config), config, state.metrics,
                                        on_phase=phases.enter, on_engine_exit=on_engine_exit)

    app = create_app(config, lambda: build_engine(args, config, phases), config.served_model_name or args.model,
                     on_load_failure, start_engine=start_engine)
    phases.state = app.state.balcony
    phases.state.phase = phases.current
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               loop=config.event_loop, timeout_graceful_shutdown=5,
                               access_log=config.log_level == "debug")
    server = DrainingServer(uv_config, app.state.balcony, config.shutdown_timeout, phases)
    server.run()
    if failed:
        reason = str(failed[0]) or type(failed[0]).__name__
        print(f"balcony serve: the model failed to load: {reason}", file=sys.stderr)
    if engine_died:
        print(f"balcony serve: {engine_died[0]}", file=sys.stderr)
    # Leave without the interpreter's teardown: freeing torch and the KV cache took 2.4 s of a
    # 2.6 s stop here, and nothing is left to save (the calibration cache is written at start-up).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed or engine_died else 0)


def build_engine(args, config: ServeConfig, phases: StartupPhases):
    """Runs in the loading thread: fetch and convert if needed, load, build the engine, warm it up
    and read (or measure and store) its step costs."""
    import torch

    from balcony_runtime.cpu_threads import ThreadGovernor
    from balcony_runtime.heap import settle_for_serving
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.model_source import balcony_home, resolve_model
    from balcony_runtime.routing.calibration_cache import CalibrationCache
    from balcony_runtime.weight_format import candidate_label, describe as describe_weights
    from server.cli import load_from_args

    # Other processes' CPU use is read over the load; if they hold cores, warm-up and calibration
    # run on the cores left (cpu_threads.py), then the step loop's own governor takes over.
    full_threads = torch.get_num_threads()
    governor = ThreadGovernor(full=full_threads)
    governor.tick()
    resolve_model(args.model, on_phase=phases.enter)  # a download and a conversion happen here, once
    phases.enter("load")
    log.info("load: %s (dtype %s, device %s, %d threads)", args.model, args.dtype, args.device,
             torch.get_num_threads())
    loaded = load_from_args(args)
    if loaded.weights is not None:
        log.info("load: weights %s", describe_weights(loaded.weights))
    served = parse_exit_list(config.exits, loaded.model.full_depth)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=config.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
                                            budget_policy=config.budget_policy, served_exits=served,
                                            starvation_ratio=config.starvation_ratio,
                                            enforce_eager=args.enforce_eager, prefix_caching=config.prefix_caching,
                                            # None: overlapped on CUDA, synchronous on a CPU
                                            overlap_steps=None if config.overlap_steps else False))
    log.info("load: done; exits %s of %d layers, %s, %d KV-cache blocks%s", ", ".join(engine.exit_names()),
             engine.model.full_depth, candidate_label(engine.model.dtype, engine.model.quantization)
             + f", {engine.model.ops.name} kernels", engine.blocks.num_blocks,
             f", {engine.graphs_recorded} CUDA graphs for decode" if engine.graphs_recorded else "")

    if engine.model.norm.device.type == "cpu":
        governor.tick()
    cache = CalibrationCache(balcony_home() / "calibration", reuse=not config.recalibrate)
    try:
        engine.calibrate(cache=cache, on_phase=phases.enter)
    finally:
        torch.set_num_threads(full_threads)
    settle_for_serving()  # what exists now lives as long as the process (balcony_runtime/heap.py)
    log.info("start-up phases: %s", phases.summary())
    return engine
