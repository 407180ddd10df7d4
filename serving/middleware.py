"""ASGI middleware: authentication before the body is read, the body size and time limits, per-route request metrics."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth import KeyRing
from serving.errors import PayloadTooLarge, RequestTimeout, ServingError, Unauthorized
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
    """Refuse bodies over `max_bytes` with 413, by Content-Length or by counting the bytes as they stream in, and
    bodies that take longer than `timeout_s` to arrive with 408.

    Nothing is buffered here: the app reads the body through a counting `receive`. When the limit or the deadline
    is passed, the client gets the 413 or 408 at once, the app is told the client went away, and whatever the app
    answers after that is dropped. Authentication runs before this (`Authenticate`), so a caller without a key
    never gets as far as sending a body anyone reads.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, self._too_large())
            return
        size = 0
        done = False
        answered = False
        deadline: float | None = None

        async def counted() -> Message:
            nonlocal size, done, answered, deadline
            if answered:
                return {"type": "http.disconnect"}
            if done:  # the body is in: what follows is the wait for a disconnect, however long the answer takes
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                answered = True
                await send_error(send, RequestTimeout(f"The request body did not arrive within {self.timeout_s:g} s."))
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    answered = True
                    await send_error(send, self._too_large())
                    return {"type": "http.disconnect"}
                done = not message.get("more_body", False)
            return message

        async def guarded(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)

    def _too_large(self) -> ServingError:
        return PayloadTooLarge(f"Request body is over this server's limit of {self.max_bytes} bytes.")


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
