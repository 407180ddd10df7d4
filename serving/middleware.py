"""ASGI middleware: authentication before the body is read, the body size limit, per-route request metrics."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth import KeyRing
from serving.errors import PayloadTooLarge, ServingError, Unauthorized
from serving.metrics import Metrics

PROTECTED_PREFIXES = ("/v1/", "/admin/")
"""Every route under these takes an API key (each checks its scope); the others (health, metrics, pages, docs)
take none. tests/test_hardening.py checks the app's routes against this."""


async def send_error(send: Send, err: ServingError) -> None:
    """Answer `err` in OpenAI's error shape, from middleware (before any route runs)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Authenticate:
    """Know the caller before anything reads the body: a request to a protected route without a valid API key
    is answered 401 here, so that a malformed body from an unknown caller learns nothing (and costs nothing to
    parse). The caller found is left in the request's state; the route's dependency checks its scope (403)."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.keyring.open and scope["path"].startswith(PROTECTED_PREFIXES):
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                principal = self.keyring.authenticate(
                    authorization.decode("latin-1") if authorization is not None else None
                )
            except Unauthorized as err:
                await send_error(send, err)
                return
            scope.setdefault("state", {})["principal"] = principal  # the routes' dependency takes it from here
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length, or by reading a chunked body up to the limit.

    A chunked body is read here in full (at most `max_bytes`) and replayed to the app, because FastAPI turns
    any error raised while it reads a body into a 400 and the client would not learn what was wrong.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, PayloadTooLarge(f"Request body is over this server's limit of {self.max_bytes} bytes."))


class RequestMetrics:
    """Count requests by route template and status, and time them to their last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
