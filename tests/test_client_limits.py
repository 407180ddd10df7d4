"""Nothing a client sends can make the gateway hold memory or sockets without bound: the head of a request has a
deadline (deploy/local/server.py), the body has a deadline and a size limit counted as it streams, applied after
authentication (serving/middleware.py), and beyond a number of connections the gateway answers 503."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from deploy.app.gateway import build_app
from deploy.local.server import server_config
from deploy.local.settings import LocalSettings
from serving.middleware import BodyLimit
from tests.gateway_helpers import KEYS, ServerThread, feedback_settings, settings_for

KEY = KEYS["full"].key.get_secret_value()


@contextlib.contextmanager
def serving(redis_url: str, tmp_path: Path, **limits: Any) -> Iterator[ServerThread]:
    """A gateway (over a vLLM address nothing answers: no request here gets that far) served as `pairloop up`
    serves it, with a 1 s body deadline, room for three connections and the server `limits` given."""
    settings = settings_for(redis_url, ["http://127.0.0.1:9"], tmp_path, body_timeout_s=1.0, max_body_bytes=4096)
    app = build_app(settings, feedback_settings(tmp_path))
    config = server_config(app, LocalSettings(data_dir=tmp_path, max_connections=3, **limits))
    config.log_level = "warning"
    with ServerThread(app, config) as server:
        yield server


@pytest.fixture
def limited(redis_url: str, tmp_path: Path) -> Iterator[ServerThread]:
    """The gateway with short deadlines: 1 s for the request head and between requests."""
    with serving(redis_url, tmp_path, header_timeout_s=1.0, keep_alive_timeout_s=1) as server:
        yield server


def _connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _closed_after(s: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server answers or closes, and what it sent."""
    start = time.monotonic()
    got = b""
    while chunk := s.recv(65536):
        got += chunk
        if b"\r\n\r\n" in got and b"content-length" in got.lower():
            break
    return time.monotonic() - start, got


def test_a_client_that_sends_its_headers_slowly_is_cut_off(limited: ServerThread) -> None:
    with _connect(limited) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        waited, got = _closed_after(s)
    assert got == b"" and 0.8 < waited < 4, (waited, got)
    with _connect(limited) as s:  # a connection that sends nothing at all
        waited, got = _closed_after(s)
    assert got == b"" and 0.8 < waited < 4, (waited, got)


def test_a_body_that_arrives_slowly_is_cut_off_with_408(limited: ServerThread) -> None:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _connect(limited) as s:
        s.sendall(head.encode() + b'{"messages": ')  # ...and the rest never comes
        waited, got = _closed_after(s)
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"request_timeout" in got and 0.8 < waited < 4, (waited, got)
    # without a key nobody waits for the body at all
    with _connect(limited) as s:
        s.sendall(head.replace(f"Authorization: Bearer {KEY}\r\n", "").encode())
        waited, got = _closed_after(s)
    assert got.startswith(b"HTTP/1.1 401") and waited < 0.8, (waited, got)


def test_beyond_the_connection_limit_the_gateway_answers_503(redis_url: str, tmp_path: Path) -> None:
    # A head deadline longer than the test, so the idle connections stay open however busy the machine is.
    with serving(redis_url, tmp_path, header_timeout_s=60.0) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # the 503 below is the limit's
        idle = [_connect(server) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10  # until the server has taken the three (it may be slow to)
            while httpx.get(f"{server.url}/healthz", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "three idle connections open, and the gateway still took more"
                time.sleep(0.05)
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not take requests again once the connections closed"
            time.sleep(0.1)


def test_the_body_deadline_does_not_cut_a_long_answer() -> None:
    """Once the body is in, the app's wait for a disconnect (a streamed answer listens for one) has no deadline."""

    async def slow_answer(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        waited = "answered"
        try:
            await asyncio.wait_for(receive(), 1.0)  # longer than the body deadline
        except TimeoutError:
            waited = "still connected"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": waited.encode()})

    async def go() -> httpx.Response:
        app = BodyLimit(slow_answer, max_bytes=1024, timeout_s=0.2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post("/", content=b"{}")

    r = asyncio.run(go())
    assert r.status_code == 200 and r.text == "still connected"
