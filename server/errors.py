"""Errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import sse

log = logging.getLogger("balcony.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def guard_stream(events):
    """Relay SSE events; an error mid-stream becomes an error event and ``[DONE]``, not a cut connection."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        yield sse.event(body)
        yield sse.DONE
    except Exception as exc:
        log.exception("error while streaming")
        body = {"error": {"message": f"internal error: {type(exc).__name__}", "type": "internal_error",
                          "param": None, "code": None}}
        yield sse.event(body)
        yield sse.DONE


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":  # loc is ("body", character offset): not a parameter
        detail = (first.get("ctx") or {}).get("error", "")
        at = first.get("loc", ())[1:]
        where = f" at character {at[0]}" if at else ""
        return f"the request body is not valid JSON{': ' + detail if detail else ''}{where}", None
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if param is None and kind == "missing":  # the body itself
        return "the request body is empty; send a JSON object", None
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":  # pydantic's "Extra inputs are not permitted" hides what was wrong
        return f"{param}: unrecognized field", param
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
