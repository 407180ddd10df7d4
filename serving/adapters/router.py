"""The gateway's side of adapter routing: follow the routing record, pick the adapter of each choice, and
keep this gateway's vLLM backends holding what is served.

Each gateway polls the record (`serving/adapters/routing.py`) every `adapter_poll_s`; when it changes, it makes sure
its backends hold the new adapters and switches. A request keeps the adapter it started with; an adapter
that no longer serves is unloaded once this gateway has no request in flight on it. A backend that
appears (discovery) or restarts takes no request until the served adapters are loaded there and answered a
probe (`Backend.ready`). Each adapter's path on a backend's host comes from `serving/adapters/hosts.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving import tasks
from serving.adapters.hosts import host_path
from serving.adapters.routing import BACKENDS_KEY, Routing, SwapResult, load_routing, swap
from serving.adapters.vllm_admin import VllmAdmin
from serving.backends import Backend, BackendPool
from serving.errors import AdapterError

log = logging.getLogger(__name__)


class AdapterRouter:
    """Follows the routing record, picks the adapter of each choice, counts requests in flight on each."""

    def __init__(
        self,
        redis: Redis,
        pool: BackendPool,
        admin: VllmAdmin,
        *,
        poll_s: float = 0.1,
        max_loras: int = 4,
        unload_grace_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.pool = pool
        pool.gated = True  # its backends take requests once this follower made them ready
        self.admin = admin
        self.poll_s = poll_s
        self.max_loras = max_loras
        self.unload_grace_s = unload_grace_s
        self.rng = rng or random.Random()
        """Draws which pairs play the challenger and on which side (a seeded one makes that reproducible)."""
        self._unneeded: dict[str, float] = {}
        """When this gateway first saw a loaded adapter it does not need (grace before unloading it)."""
        self.routing = Routing()
        self.in_flight: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._registered = 0.0
        self._lock = asyncio.Lock()
        self._warned: dict[str, str] = {}

    # choices

    def choose(self, n: int, base: str) -> list[str]:
        """The vLLM model name of each of `n` choices: the champion, or for a share of pairs, champion and
        challenger on random sides."""
        r = self.routing
        champion = r.champion or base
        if n == 2 and r.challenger and r.ab_fraction > 0 and self.rng.random() < r.ab_fraction:
            pair = [champion, r.challenger]
            self.rng.shuffle(pair)
            return pair
        return [champion] * n

    @contextlib.contextmanager
    def hold(self, names: list[str]) -> Iterator[None]:
        for name in names:
            self.in_flight[name] += 1
        try:
            yield
        finally:
            for name in names:
                self.in_flight[name] -= 1

    # following the record

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="adapter-routing")

    async def stop(self) -> None:
        await tasks.stop(self._task)

    async def _loop(self) -> None:
        while True:
            await self.try_sync()
            await asyncio.sleep(self.poll_s)

    async def try_sync(self) -> None:
        """`sync`, its failure logged and, for Redis, given as the reason no backend is ready (the next pass
        retries)."""
        try:
            await self.sync()
            self.pool.not_ready_reason = None
        except RedisError as exc:
            self.pool.not_ready_reason = f"Redis is unreachable: {exc}"
            log.warning("adapter routing: %s", exc)
        except (OSError, AdapterError, ValueError) as exc:
            log.warning("adapter routing: %s", exc)

    async def sync(self) -> None:
        """One pass: register the backends, follow a changed record, prepare new or restarted backends, unload."""
        async with self._lock:
            healthy = [b for b in self.pool.healthy() if not b.draining]
            now = time.time()
            if healthy and now - self._registered > 1.0:
                await self.redis.zadd(BACKENDS_KEY, {b.url: now for b in healthy})
                self._registered = now
            desired = await load_routing(self.redis)
            for backend in healthy:
                try:
                    await self._prepare(backend, desired)
                except AdapterError as exc:
                    self._warn(backend.url, exc.message)
            if desired.epoch != self.routing.epoch:
                log.info("serving champion %s, challenger %s", desired.champion, desired.challenger)
                self.routing = desired
            await self._unload(healthy)

    async def _prepare(self, backend: Backend, desired: Routing) -> None:
        """Load what `desired` serves on `backend`; a backend not ready yet is probed, then takes requests."""
        for name in desired.served():
            if name not in backend.models:
                # no wait: a host whose sidecar lacks it is tried again next pass, and the others go on meanwhile
                await self._load(backend, name, desired.paths[name], timeout_s=0.0)
        if not backend.ready:
            for name in desired.served() or [backend.base_model or ""]:
                await self.admin.probe(backend.url, name)
            self.pool.set_ready(backend)
            self._warned.pop(backend.url, None)

    def _warn(self, key: str, message: str) -> None:
        """Log a problem once, not at every pass while it lasts."""
        if self._warned.get(key) != message:
            log.warning("adapter routing: %s", message)
            self._warned[key] = message

    async def _load(self, backend: Backend, name: str, path: str, *, timeout_s: float) -> None:
        await self.admin.load(backend.url, name, await host_path(self.redis, backend.url, path, timeout_s=timeout_s))
        backend.models = [*backend.models, name]

    async def ensure(self, backend: Backend, name: str) -> None:
        """Load a served adapter on `backend` if it lacks it (a backend that restarted, before the next pass)."""
        path = self.routing.paths.get(name)
        if path is None:
            raise AdapterError(f"no directory is known for adapter {name}", 503)
        await self._load(backend, name, path, timeout_s=2.0)

    def keep(self) -> set[str]:
        """Adapters to keep loaded: those served, and the previous champion while slots allow (one slot
        stays free for a draining version)."""
        keep = set(self.routing.served())
        previous = self.routing.previous()
        if previous and len(keep) + 1 < self.max_loras:
            keep.add(previous)
        return keep

    async def _unload(self, healthy: list[Backend]) -> None:
        """Unload adapters this gateway neither serves nor keeps, once none of its requests is in flight on
        them and `unload_grace_s` has passed: a swap elsewhere may have just loaded one (it writes the
        record after loading and probing), and other replicas' requests get time to drain."""
        keep = self.keep()
        now = time.monotonic()
        loaded = {m for b in healthy for m in b.models}
        self._unneeded = {n: t for n, t in self._unneeded.items() if n in loaded and n not in keep}
        for backend in healthy:
            for name in backend.models:
                if name == backend.base_model or name in keep or self.in_flight[name] > 0:
                    continue
                if now - self._unneeded.setdefault(name, now) < self.unload_grace_s:
                    continue
                await self.admin.unload(backend.url, name)
                backend.models = [m for m in backend.models if m != name]
                log.info("unloaded %s from %s", name, backend.url)

    async def swap(self, change: Callable[[Routing], Routing]) -> SwapResult:
        """A swap through this gateway's own backends, followed at once (no poll delay)."""
        urls = [b.url for b in self.pool.healthy() if not b.draining]
        result = await swap(self.redis, self.admin, urls, change)
        async with self._lock:
            for backend in self.pool.healthy():
                if backend.url in urls:
                    backend.models = sorted({*backend.models, *result.after.served()})
            self.routing = result.after
        return result
