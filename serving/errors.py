"""The gateway's exceptions and their one mapping to HTTP answers in OpenAI's error shape.

ServingError
├── InvalidRequest          400  a request that is well-formed JSON but asks for something we refuse
├── Unauthorized            401  no key, or a wrong one
├── Forbidden               403  a key without the scope
├── ModelNotFound           404  a model (or adapter) we do not serve
├── Conflict                409  the request clashes with the current state (a round already running, ...)
├── AdapterError            404/409/502/503  a swap could not be made; nothing changed in what is served
├── PayloadTooLarge         413  a body over the size limit
├── RateLimited             429  a key's or user's token bucket is empty: retry after `Retry-After`
├── UpstreamError           4xx  vLLM refused the request (its status and message are passed on)
└── Unavailable             503  no vLLM backend or no Redis: try again after `Retry-After`

Other packages extend the tree (feedback/errors.py). Anything else that escapes a route is answered by the
catch-all as a 500 in the same shape, logged with its traceback, and never shows the client its message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import Metrics

log = logging.getLogger(__name__)


class ServingError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(ServingError):
    status_code = 400
    type = "invalid_request_error"


class Unauthorized(ServingError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class ModelNotFound(ServingError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(ServingError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class AdapterError(ServingError):
    """A swap could not be made (unknown or rejected adapter, vLLM refused it, the record kept changing);
    nothing changed in what is served. `status`: 400 not an adapter, 404 unknown, 409 conflict, 502 vLLM failed,
    503 no backend."""

    _KINDS = {  # noqa: RUF012 (read only)
        400: ("invalid_request_error", "invalid_adapter"),
        404: ("invalid_request_error", "adapter_not_found"),
        409: ("invalid_request_error", "adapter_conflict"),
        502: ("server_error", "upstream_error"),
        503: ("service_unavailable", "unavailable"),
    }

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = self.status_code = status
        self.type, self.code = self._KINDS.get(status, ("server_error", "adapter_error"))


class PayloadTooLarge(ServingError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RequestTimeout(ServingError):
    status_code = 408
    type = "invalid_request_error"
    code = "request_timeout"


class _RetryLater(ServingError):
    """An answer that tells the client when to try again (`Retry-After`)."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimited(_RetryLater):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ServingError):
    """vLLM answered the request with a client error; its status and message reach the client."""

    type = "invalid_request_error"

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class Unavailable(_RetryLater):
    status_code = 503
    type = "service_unavailable"
    code = "unavailable"


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="The kind: invalid_request_error, authentication_error, permission_error, …")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable code for programs (invalid_api_key, rate_limit_exceeded, …).")


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every error of every route."""

    error: ErrorDetail


REFUSALS: dict[int, str] = {
    400: "Malformed JSON, or a value this server refuses (n > 2, temperature 0 pairs, max_tokens over the limit, "
    "a prompt longer than the context, an adapter name that is not one).",
    401: "No API key, or one this server does not know. Checked before the body is read.",
    403: "The API key lacks this route's scope (or, for feedback, the token was issued for another key).",
    404: "No such model, adapter or served completion.",
    409: "The request conflicts with the current state: a round already queued or running, an adapter that "
    "cannot be promoted, nothing to roll back to, a vote that contradicts one already given.",
    410: "The completion is past its feedback window.",
    413: "The body is over PAIRLOOP_MAX_BODY_BYTES.",
    422: "A field is missing, unknown or of the wrong type or range (`param` names it).",
    429: "A rate limit (per API key or per user) is spent: retry after `Retry-After` seconds.",
    500: "An unexpected error; it was logged, and its details are not shown.",
    502: "A vLLM server refused to load an adapter; nothing changed in what is served.",
    503: "No vLLM backend is ready, or Redis or the preference store cannot be reached: retry after `Retry-After`.",
}
"""What each status means on this API (the OpenAPI document's response descriptions)."""

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer these error statuses (always in OpenAI's shape)."""
    return {
        code: {"model": ErrorResponse, "description": REFUSALS[code]}
        | ({"headers": _RETRY_AFTER} if code in (429, 503) else {})
        for code in codes
    }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _serving_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        msg = f"Request body is not valid JSON: {detail.get('ctx', {}).get('error', 'parse error')}"
        return JSONResponse(error_body(msg, "invalid_request_error", "invalid_json"), status_code=400)
    first = errors[0]
    field = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        msg = f"Unknown field '{field}': this server does not accept it."
    elif first.get("type") == "missing":
        msg = f"Missing required field '{field}'."
    else:
        msg = f"Invalid value for '{field}': {first.get('msg')}."
    if len(errors) > 1:
        msg += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''} in the request)"
    return JSONResponse(error_body(msg, "invalid_request_error", "invalid_field", field), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", None),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: a bug or an outage nobody mapped. Logged with its traceback; the client learns
    only that it happened (internals such as paths, SQL or addresses stay in the log)."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    body = error_body("The server had an unexpected error; it has been logged.", "server_error", "internal_error")
    return JSONResponse(body, status_code=500)


Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def install_handlers(app: FastAPI, metrics: Metrics | None = None) -> None:
    """Map every error the gateway raises, FastAPI's own, and any unexpected one to OpenAI's error shape, and
    count each answer in `metrics` by its type."""

    def counted(handler: Handler, type_of: Callable[[Exception], str]) -> Handler:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            if metrics is not None:
                metrics.errors.labels(type_of(exc)).inc()
            return await handler(request, exc)

        return handle

    def invalid(_: Exception) -> str:
        return "invalid_request_error"

    app.add_exception_handler(ServingError, counted(_serving_error, lambda e: getattr(e, "type", "server_error")))
    app.add_exception_handler(RequestValidationError, counted(_validation_error, invalid))
    app.add_exception_handler(StarletteHTTPException, counted(_http_error, invalid))
    app.add_exception_handler(Exception, counted(_unexpected, lambda _: "server_error"))
