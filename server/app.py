"""The FastAPI application: OpenAI endpoints, health, readiness and metrics.

The model loads in the background after the server starts listening, so /health answers at once
and /ready says 503 until the model is loaded, warmed up and the router calibrated.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from balcony_runtime.engine import LLMEngine
from balcony_runtime.errors import RequestError
from balcony_runtime.heap import settle_for_serving
from server import chat, completions
from server.async_engine import AsyncEngine
from server.errors import APIError, guard_stream, install_error_handlers
from server.generation_group import GenerationGroup, compile_grammars
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.routing_headers import BUDGET_HEADER, EXIT_HEADER, parse_budget, parse_exit
from server.sampling_defaults import with_sampling_defaults
from server.serve_options import ServeConfig
from server.tool_parsers import ToolCallFormat, chat_template_text, select_format

log = logging.getLogger("balcony.server")


@dataclass
class ServerState:
    config: ServeConfig
    model_name: str
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    phase: str = "starting"  # start-up phase for /ready (server/serve.py moves it on)
    tool_format: ToolCallFormat = ToolCallFormat(None, "the model is not loaded")  # tool_choice "auto"'s, set at load

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining


def prepare_engine(build: Callable[[], LLMEngine], state: ServerState) -> AsyncEngine:
    """Load the model, warm it up and calibrate the router (runs in a worker thread)."""
    started = time.monotonic()
    engine = build()
    router = engine.router or engine.calibrate()  # serve.py's builder calibrates (through its cache)
    log.info("model ready in %.1fs; predicted decode step of one row: %s", time.monotonic() - started,
             router.model.step_cost.describe(engine.exits))
    _choose_tool_format(state, engine.tokenizer)
    return AsyncEngine(engine, state.metrics, state.config.max_queued_requests)


def start_remote_engine(start_engine: Callable[[ServerState], AsyncEngine], state: ServerState) -> AsyncEngine:
    """prepare_engine's counterpart for an engine started elsewhere (runs in a worker thread)."""
    engine = start_engine(state)
    _choose_tool_format(state, engine.engine.tokenizer)
    # As the in-process builder does once the engine is built (server/serve.py): what this process
    # holds now (imports, the tokenizer) lives as long as it does; its steps' outputs are
    # collected as the engine's are.
    settle_for_serving()
    return engine


def _choose_tool_format(state: ServerState, tokenizer) -> None:
    state.tool_format = select_format(state.config.tool_call_parser, chat_template_text(tokenizer))
    log.info("tool_choice auto: %s", state.tool_format.note if state.tool_format.parser
             else f"answered with a 400: {state.tool_format.note}")


async def in_own_thread(fn: Callable, *args):
    """``await fn(*args)`` run in a new thread that ends with it.

    Not asyncio.to_thread: its executor's threads live on, and the model's load, warm-up and
    calibration run torch's OpenMP-parallel products, so that thread would keep an OpenMP team for
    the process's lifetime beside the step loop's. libgomp then counts more threads than cores and
    makes every waiting worker sleep almost at once instead of spinning; each of a decode step's
    hundred-odd parallel products then pays a wake-up (a one-row step on two cores: 7.9 -> 9.5 ms,
    docs/benchmarks.md). A thread that has exited takes its team with it.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            # Passed as an argument: the name ``exc`` is unbound when the except block ends, so a
            # callback that looked it up later would raise NameError and leave the future pending
            # (a server that could not load stayed "loading" for ever).
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=run, name="balcony-loader", daemon=True).start()
    return await done


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future refuses it (it would end a generator)
        future.set_exception(RuntimeError(f"StopIteration: {error}"))
    else:
        future.set_exception(error)


def create_app(config: ServeConfig, build: Callable[[], LLMEngine], model_name: str,
               on_load_failure: Callable[[BaseException], None] | None = None,
               start_engine: Callable[[ServerState], AsyncEngine] | None = None) -> FastAPI:
    """``build`` makes the engine in this process (its step loop a thread); ``start_engine``, when
    given, starts one elsewhere instead (server/engine_process.py) and ``build`` is not called."""
    state = ServerState(config, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        async def load() -> None:
            try:
                if start_engine is None:
                    engine = await in_own_thread(prepare_engine, build, state)
                else:
                    engine = await in_own_thread(start_remote_engine, start_engine, state)
            except BaseException as exc:
                log.exception("model failed to load")
                state.load_error = f"{type(exc).__name__}: {exc}"
                if on_load_failure is not None:
                    on_load_failure(exc)
                return
            engine.start(loop)
            state.engine = engine

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="Balcony Serve", lifespan=lifespan)
    app.state.balcony = state
    install_error_handlers(app)

    # The dependencies are coroutines: FastAPI runs a plain function dependency in its thread pool,
    # a hop to another thread and back for every request, for checks that never wait on anything.
    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)",
                           "authentication_error", code="invalid_api_key")

    async def require_json(request: Request) -> None:
        # 415, not 400: the body may be fine, the header framing it is not, and 415 names exactly
        # that. Without this check the body reaches validation as bytes and pydantic answers with
        # "Input should be a valid dictionary", which points nowhere near the cause.
        sent = request.headers.get("content-type")
        if not is_json(sent):
            got = f"got Content-Type: {sent}" if sent else "no Content-Type header was sent"
            raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' ({got})",
                           param="Content-Type", code="unsupported_media_type")

    def engine_or_503() -> AsyncEngine:
        if state.draining:
            raise APIError(503, "the server is shutting down", "unavailable_error", code="draining")
        if state.engine is None:
            message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
            raise APIError(503, message, "unavailable_error", code="not_ready", headers={"Retry-After": "5"})
        return state.engine

    def no_such_model(name: str) -> APIError:
        return APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                        "not_found_error", param="model", code="model_not_found")

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise no_such_model(name)

    async def run(request: Request, body, specs_of, respond, stream_respond):
        engine = engine_or_503()
        check_model(body.model)
        received = time.monotonic()
        budget = parse_budget(request.headers.get(BUDGET_HEADER))
        forced = parse_exit(request.headers.get(EXIT_HEADER), engine.engine.exits, engine.engine.model.full_depth)
        try:
            specs = specs_of(engine.engine)
        except (RequestError, ValueError) as exc:
            raise APIError(400, str(exc)) from exc
        await compile_grammars(engine.engine, specs, body.grammar_param)
        group = GenerationGroup(engine, specs, budget, forced, received)
        await group.submit()
        headers = {EXIT_HEADER: group.exit_label}
        if body.stream:
            events = stream_respond(body, group, engine.engine.tokenizer, state.model_name)
            return StreamingResponse(guard_stream(events), media_type="text/event-stream", headers=headers)
        result = await _until_disconnect(request, respond(body, group, engine.engine.tokenizer, state.model_name))
        return JSONResponse(result, headers=headers)

    @app.post("/v1/completions", dependencies=[Depends(require_key), Depends(require_json)])
    async def create_completion(body: CompletionRequest, request: Request):
        body = with_sampling_defaults(body, state.config.sampling_defaults)
        return await run(request, body, lambda e: completions.build_specs(body, e.tokenize),
                         completions.complete, completions.stream_completion)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key), Depends(require_json)])
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        body = with_sampling_defaults(body, state.config.sampling_defaults)
        tool_format = state.tool_format  # the call format tool_choice "auto" reads
        parser = tool_format.parser
        return await run(request, body,
                         lambda e: chat.build_specs(body, e.tokenizer, e.loaded.max_model_len, state.model_name,
                                                    tool_format),
                         partial(chat.chat_complete, parser=parser), partial(chat.stream_chat, parser=parser))

    def model_cards() -> list[dict]:
        engine = engine_or_503().engine
        evaluation = (engine.loaded.adapters.evaluation if engine.loaded.adapters else {}) or {}
        exits = [{"exit": "full" if e == engine.model.full_depth else str(e), "layers": e,
                  "quality": evaluation.get(str(e)) or evaluation.get("full" if e == engine.model.full_depth else str(e))}
                 for e in engine.exits]
        return [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "balcony-serve",
            "root": engine.loaded.identity, "max_model_len": engine.loaded.max_model_len,
            "balcony": {"full_depth": engine.model.full_depth, "exits": exits,
                        "trained_adapters": engine.loaded.adapters is not None},
        }]

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": model_cards()}

    # ":path" because model ids are often hub ids, with a '/' in them.
    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def retrieve_model(model_id: str):
        for card in model_cards():
            if card["id"] == model_id:
                return card
        raise no_such_model(model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.ready:
            return {"status": "ready"}
        reason = "draining" if state.draining else ("load failed: " + state.load_error if state.load_error else "loading")
        return JSONResponse({"status": "not ready", "reason": reason, "phase": state.phase}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def is_json(content_type: str | None) -> bool:
    """application/json or any application/*+json, parameters (charset) aside."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _until_disconnect(request: Request, work):
    """Await ``work`` unless the client disconnects first; then cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if not done and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
