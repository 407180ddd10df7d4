"""The route filter pairloop installs inside every vLLM server it starts (`--middleware serving.vllm_guard.VllmGuard`).

vLLM checks its API key only on paths under `/v1`, `/v2`, `/inference` and `/cohere`; with runtime LoRA updating
on, it also serves SageMaker-style routes outside them (`POST /adapters`, `DELETE /adapters/<name>`,
`POST /invocations`) that answer anyone. This middleware runs before every route of vLLM's app and lets through only
what the gateways and the trainer use (`ALLOWED`), every one of them but the liveness probe with the key; whatever
else vLLM serves answers 404. A LoRA load must name a directory inside one of the adapter directories this vLLM
server was given (`ADAPTER_DIRS_ENV`), so even a holder of the key cannot make it load weights from anywhere else.

It runs in vLLM's process, so it imports only what vLLM itself brings (starlette) and reads its configuration from
the environment: the key from VLLM_API_KEY (as vLLM does), the adapter directories from `ADAPTER_DIRS_ENV`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ADAPTER_DIRS_ENV = "PAIRLOOP_VLLM_ADAPTER_DIRS"
"""The directories (os.pathsep-separated) vLLM may load adapters from; unset or empty: it loads none."""

OPEN = {("GET", "/health")}
"""Routes anyone who reaches vLLM may call: the container probes, which carry no key."""

ALLOWED = OPEN | {
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/metrics"),
}
"""Every route the gateways, the trainer and a Prometheus scraper use; all but `OPEN` take the key."""

LOAD_PATH = "/v1/load_lora_adapter"
MAX_LOAD_BODY = 16 * 1024
"""A LoRA load request is a name and a path: larger bodies are refused unread."""


def allowed_dirs(value: str | None) -> list[Path]:
    """The adapter directories named by `value` (the `ADAPTER_DIRS_ENV` format), resolved."""
    return [Path(p).resolve() for p in (value or "").split(os.pathsep) if p.strip()]


def inside(path: str, dirs: list[Path]) -> bool:
    """Whether `path`, with every link resolved, lies strictly inside one of `dirs`."""
    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(target != d and target.is_relative_to(d) for d in dirs)


class VllmGuard:
    """Pure ASGI middleware: the allow-list, the key on every route but `OPEN`, loads only from the adapter dirs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY") or ""
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None
        self.dirs = allowed_dirs(os.environ.get(ADAPTER_DIRS_ENV))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        route = (scope.get("method", ""), scope.get("path", ""))
        if route not in ALLOWED:
            await _answer(send, 404, "not found")
            return
        if route not in OPEN and not self._has_key(scope):
            await _answer(send, 401, "unauthorized")
            return
        if route[1] == LOAD_PATH:
            body, error = await _read_body(receive)
            if error is None:
                error = self._check_load(body)
            if error is not None:
                await _answer(send, error[0], error[1])
                return
            await self.app(scope, _replay(body, receive), send)
            return
        await self.app(scope, receive, send)

    def _has_key(self, scope: Scope) -> bool:
        if self.key_hash is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return secrets.compare_digest(hashlib.sha256(token.encode("latin-1")).digest(), self.key_hash)
        return False

    def _check_load(self, body: bytes) -> tuple[int, str] | None:
        try:
            request = json.loads(body)
        except ValueError:
            return 400, "the body is not JSON"
        path = request.get("lora_path") if isinstance(request, dict) else None
        if not isinstance(path, str) or not path:
            return 400, "lora_path is required"
        if not inside(path, self.dirs):
            return 403, "lora_path is outside the adapter directories this server loads from"
        return None


async def _read_body(receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", (400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_LOAD_BODY:
            return b"", (413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
