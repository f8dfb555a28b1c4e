"""The one place where errors become OpenAI-style envelopes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from swarmgate.api.responses import json_response
from swarmgate.errors import SwarmgateError

log = logging.getLogger("swarmgate.api")

_HTTP_CODES = {
    400: ("INVALID_REQUEST", "invalid_request_error"),
    401: ("INVALID_API_KEY", "authentication_error"),
    404: ("NOT_FOUND", "invalid_request_error"),
    405: ("METHOD_NOT_ALLOWED", "invalid_request_error"),
    413: ("REQUEST_TOO_LARGE", "invalid_request_error"),
    415: ("UNSUPPORTED_MEDIA_TYPE", "invalid_request_error"),
    422: ("INVALID_REQUEST", "invalid_request_error"),
}


def error_response(error: SwarmgateError) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return json_response(error.to_dict(), status_code=error.status_code, headers=headers)


def envelope(
    status: int, message: str, code: str, type_: str, param: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": type_, "code": code, "param": param}}
    return json_response(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_swarmgate_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SwarmgateError)
        return error_response(exc)

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code, type_ = _HTTP_CODES.get(exc.status_code, ("HTTP_ERROR", "invalid_request_error"))
        response = envelope(exc.status_code, str(exc.detail), code, type_)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"Invalid value for '{param}': {first['msg']}." if param else str(first["msg"])
        return envelope(400, message, "INVALID_REQUEST", "invalid_request_error", param)

    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        # Never echo internals (or request content) back; the traceback goes to the log.
        log.exception("unhandled error", exc_info=exc)
        return envelope(500, "Internal error. It has been logged.", "INTERNAL_ERROR", "api_error")

    app.add_exception_handler(SwarmgateError, on_swarmgate_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
