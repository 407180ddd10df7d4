"""The vLLM servers behind the gateway: health probes and the choice of a backend per request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from serving.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    models: list[str] = field(default_factory=list)
    """Names vLLM serves (the base model first, then loaded adapters), from its last `/v1/models`."""
    base_model: str | None = None


class BackendPool:
    """Spreads requests over healthy backends (fewest in flight first) and probes each one periodically.

    A backend is healthy when its `/v1/models` answers; a connection error during a request marks it
    unhealthy at once, so the next request goes elsewhere (or gets a 503) without waiting for a probe.
    """

    def __init__(
        self,
        urls: list[str],
        client: aiohttp.ClientSession,
        *,
        interval_s: float = 1.0,
        retry_after_s: int = 5,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a backend pool needs at least one URL")
        self.backends = [Backend(u.rstrip("/")) for u in urls]
        self._client = client
        self.headers = headers or {}
        """Sent with every request to a backend (vLLM's `--api-key`, if it has one)."""
        self._interval_s = interval_s
        self._retry_after_s = retry_after_s
        self._rr = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return any(b.healthy for b in self.backends)

    def base_model(self) -> str | None:
        """The base model's name as the healthy backends report it."""
        return next((b.base_model for b in self.backends if b.healthy and b.base_model), None)

    async def probe(self, backend: Backend) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=min(5.0, self._interval_s * 3))
            async with self._client.get(f"{backend.url}/v1/models", timeout=timeout, headers=self.headers) as resp:
                resp.raise_for_status()
                data = (await resp.json())["data"]
            backend.models = [m["id"] for m in data]
            backend.base_model = next((m["id"] for m in data if not m.get("parent")), None)
            healthy = True
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            healthy = False
        if healthy != backend.healthy:
            log.warning("vLLM backend %s is %s", backend.url, "up" if healthy else "DOWN")
            backend.healthy = healthy
            self._changed.set()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(b) for b in self.backends))

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="vllm-health")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until some backend is healthy (True), or `timeout_s` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.ready:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def mark_down(self, backend: Backend, reason: str) -> None:
        if backend.healthy:
            log.warning("vLLM backend %s is DOWN (%s)", backend.url, reason)
        backend.healthy = False

    def pick(self, exclude: set[str] | None = None, model: str | None = None) -> Backend:
        healthy = [b for b in self.backends if b.healthy and b.url not in (exclude or ())]
        if model is not None:
            # a backend that restarted serves an adapter only once the gateway loaded it there again
            healthy = [b for b in healthy if model in b.models] or healthy
        if not healthy:
            raise Unavailable(
                "No inference backend is available; try again shortly.", retry_after_s=self._retry_after_s
            )
        least = min(b.in_flight for b in healthy)
        candidates = [b for b in healthy if b.in_flight == least]
        return candidates[next(self._rr) % len(candidates)]

    @contextlib.asynccontextmanager
    async def lease(self, exclude: set[str] | None = None, model: str | None = None) -> AsyncIterator[Backend]:
        """Pick a backend (one that has `model` loaded, if any has) and count the request as in flight on it
        until the block ends."""
        backend = self.pick(exclude, model)
        backend.in_flight += 1
        try:
            yield backend
        finally:
            backend.in_flight -= 1
