"""The vLLM servers behind the gateway: discovery, health probes and the choice of a backend per request.

The servers are a fixed list of URLs, DNS names re-resolved periodically (`dns+http://vllm:8000`: every
address the name has is a backend, as a Kubernetes headless Service gives), or both. A backend that
appears, or comes back after being down, takes no traffic until it is `ready`: the gateway's follower
(`serving/adapters/router.py`) has loaded the served adapters there and probed them. One that disappears from
DNS is drained (no new requests) and forgotten once its requests in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from serving import tasks
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
    ready: bool = False
    """Healthy, and holding the served adapters, probed, since it last came up (only then it takes requests)."""
    draining: bool = False
    """Gone from discovery: takes no new request, forgotten once none is in flight."""
    source: str = ""
    """The configured entry it came from (a URL, or a `dns+` name)."""


DNS_SCHEME = "dns+"


def is_discovered(entry: str) -> bool:
    return entry.startswith(DNS_SCHEME)


def address_url(scheme: str, address: str, port: int) -> str:
    """`scheme://address:port`, with an IPv6 address in brackets."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}"


async def resolve_entry(entry: str) -> list[str]:
    """The backend URLs of one `dns+http://name:port` entry: one per address of `name` (sorted)."""
    parts = urlsplit(entry[len(DNS_SCHEME) :])
    if not parts.hostname:
        raise ValueError(f"{entry}: no host name")
    scheme = parts.scheme or "http"
    port = parts.port or (443 if scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    return sorted({address_url(scheme, str(info[4][0]), port) for info in infos})


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
        discovery_s: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("a backend pool needs at least one URL")
        self.entries = [u.rstrip("/") for u in urls]
        self.backends = [Backend(u, source=u) for u in self.entries if not is_discovered(u)]
        self.gated = False
        """Set by the follower: backends take requests only once it made them `ready`."""
        self.not_ready_reason: str | None = None
        """Why the follower could not make backends ready (told to clients while none is)."""
        self._discovery_s = discovery_s
        self._discovered_at = -1e9
        self._client = client
        self.headers = headers or {}
        """Sent with every request to a backend (vLLM's `--api-key`, if it has one)."""
        self._interval_s = interval_s
        self._retry_after_s = retry_after_s
        self._rr = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return any(self._serves(b) for b in self.backends)

    def _serves(self, b: Backend) -> bool:
        return b.healthy and (b.ready or not self.gated) and not b.draining

    async def discover(self) -> None:
        """Re-resolve the `dns+` entries: add the new addresses (not ready yet), drain the vanished ones."""
        found: dict[str, str] = {}
        for entry in self.entries:
            if not is_discovered(entry):
                continue
            try:
                urls = await resolve_entry(entry)
            except (OSError, ValueError) as exc:
                # a failing lookup keeps the last answer: DNS trouble must not drain every backend
                log.warning("discovery: cannot resolve %s: %s", entry, exc)
                found |= {b.url: entry for b in self.backends if b.source == entry}
                continue
            found |= dict.fromkeys(urls, entry)
        known = {b.url for b in self.backends}
        for url, entry in found.items():
            if url not in known:
                log.warning("discovery: new vLLM backend %s (from %s)", url, entry)
                self.backends.append(Backend(url, source=entry))
        for b in self.backends:
            if is_discovered(b.source) and b.url not in found and not b.draining:
                log.warning("discovery: vLLM backend %s is gone; draining it", b.url)
                b.draining = True
            elif b.draining and b.url in found:
                b.draining = False
        self.backends = [b for b in self.backends if not (b.draining and b.in_flight == 0)]

    def base_model(self) -> str | None:
        """The base model's name as the healthy backends report it."""
        return next((b.base_model for b in self.backends if b.healthy and b.base_model), None)

    def healthy(self) -> list[Backend]:
        """Backends whose health probe answers (ready or not), draining ones included."""
        return [b for b in self.backends if b.healthy]

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
            backend.ready = False  # back up: the follower loads and probes the served adapters first

    async def probe_all(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._discovered_at >= self._discovery_s:
            self._discovered_at = loop.time()
            await self.discover()
        await asyncio.gather(*(self.probe(b) for b in self.backends))

    def set_ready(self, backend: Backend) -> None:
        if not backend.ready:
            log.info("vLLM backend %s takes requests", backend.url)
        backend.ready = True

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="vllm-health")

    async def stop(self) -> None:
        await tasks.stop(self._task)

    def mark_down(self, backend: Backend, reason: str) -> None:
        if backend.healthy:
            log.warning("vLLM backend %s is DOWN (%s)", backend.url, reason)
        backend.healthy = False
        backend.ready = False

    def pick(self, exclude: set[str] | None = None, model: str | None = None) -> Backend:
        healthy = [b for b in self.backends if self._serves(b) and b.url not in (exclude or ())]
        if model is not None:
            # a backend that restarted serves an adapter only once the gateway loaded it there again
            healthy = [b for b in healthy if model in b.models] or healthy
        if not healthy:
            up = any(b.healthy and not b.draining for b in self.backends)
            message = "No inference backend is available; try again shortly."
            if up and self.not_ready_reason:
                message = f"No inference backend is ready ({self.not_ready_reason}); try again shortly."
            raise Unavailable(message, retry_after_s=self._retry_after_s)
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
