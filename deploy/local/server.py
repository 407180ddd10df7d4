"""The gateway's HTTP server: uvicorn with limits on what one client can hold.

uvicorn bounds the idle time between two requests on a kept-alive connection (`timeout_keep_alive`) and, with
`limit_concurrency`, answers 503 to requests beyond a number of connections and tasks; it has no deadline for the
request line and headers. `HeaderDeadline` adds one: a connection that has not sent a whole request head within
`header_timeout_s` of opening (or of starting a request) is closed. The body's own deadline and size limit are the
app's (`serving/middleware.py`, BodyLimit), applied after authentication.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from deploy.local.settings import LocalSettings


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head takes longer than `timeout_s`."""

    timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def header_deadline(timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class uvicorn should use: `HeaderDeadline` with this deadline."""
    return type("HeaderDeadline", (HeaderDeadline,), {"timeout_s": timeout_s})


def server_config(app: Any, settings: LocalSettings) -> uvicorn.Config:
    """The uvicorn configuration the gateway runs with: `settings`' address and limits."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        http=header_deadline(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or 1,
    )
