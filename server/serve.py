"""``balcony serve``: uvicorn with a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops admitting requests (/ready and new requests answer 503),
lets the requests in flight finish for up to ``--shutdown-timeout`` seconds, then exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import uvicorn

from server.app import create_app
from server.serve_options import ServeConfig, parse_exit_list

log = logging.getLogger("balcony.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float):
        super().__init__(config)
        self.balcony_state = state
        self.shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        state = self.balcony_state
        if state.draining or self._drain_task is not None:
            return super().handle_exit(sig, frame)  # a second signal: exit now
        state.draining = True
        if state.engine is not None:
            state.engine.draining = True
        log.info("draining: %d requests in flight, up to %.0fs", state.engine.num_in_flight if state.engine else 0,
                 self.shutdown_timeout)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        engine = self.balcony_state.engine
        while engine is not None and engine.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(args) -> int:
    from server.cli import load_from_args
    from balcony_runtime.engine import EngineConfig, LLMEngine

    try:
        config = ServeConfig(
            host=args.host, port=args.port, api_key=args.api_key or None, max_num_seqs=args.max_num_seqs,
            max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
            budget_policy=args.budget_policy, exits=args.exits, starvation_ratio=args.starvation_ratio,
            served_model_name=args.served_model_name,
            log_level=args.log_level,
        )
    except ValueError as exc:
        print(f"balcony serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def build() -> LLMEngine:
        loaded = load_from_args(args)
        served = parse_exit_list(config.exits, loaded.model.full_depth)
        return LLMEngine(loaded, EngineConfig(max_num_seqs=config.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
                                             budget_policy=config.budget_policy, served_exits=served,
                                             starvation_ratio=config.starvation_ratio))

    failed: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True  # a server that cannot load exits non-zero, so it is restarted

    app = create_app(config, build, config.served_model_name or args.model, on_load_failure)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=5, access_log=config.log_level == "debug")
    server = DrainingServer(uv_config, app.state.balcony, config.shutdown_timeout)
    server.run()
    if failed:
        print(f"balcony serve: the model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0
