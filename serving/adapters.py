"""Which LoRA adapter serves: the routing record in Redis, swaps that load before they flip, and the
gateway's side that follows the record.

The routing record (`pairloop:routing`, JSON) names the champion (None: the base model), an optional
challenger with the share of pairs it plays in (`ab_fraction`), earlier champions for rollback, and each
adapter's directory. Every gateway replica follows the same record, so they agree on what is served.

A swap (`promote`, `rollback`, `set_challenger`, `clear_challenger`) first loads every adapter the new
record serves into every vLLM backend and checks each with a one-token probe request, and only then
writes the record (optimistically: a concurrent swap makes it start over). Adapters are loaded under
their immutable version names and never reloaded under a name already loaded: vLLM's same-name reloads
have open bugs (stale prefix-cache KV, weights changing mid-generation; shared/notes/STACK.md).

Swaps can run anywhere that reaches Redis and the vLLM servers (the gateway's admin API, the training
worker, `pairloop adapters`): gateways list their backends in Redis (`pairloop:vllm-backends`).
Each gateway polls the record every `adapter_poll_s`; when it changes, it makes sure its backends
hold the new adapters and switches. A request keeps the adapter it started with; an adapter that no
longer serves is unloaded once this gateway has no request in flight on it. A backend that restarts
is given the served adapters again before requests for them are sent to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from serving.backends import Backend, BackendPool

log = logging.getLogger(__name__)

ROUTING_KEY = "pairloop:routing"
BACKENDS_KEY = "pairloop:vllm-backends"
HISTORY_LIMIT = 10


class AdapterError(Exception):
    """A swap could not be made; nothing changed in what is served."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Routing(BaseModel):
    champion: str | None = None
    """The adapter that serves (None: the base model)."""
    challenger: str | None = None
    ab_fraction: float = Field(0.0, ge=0, le=1)
    """Share of two-choice requests whose pair is champion against challenger."""
    history: list[str | None] = Field(default_factory=list)
    """Earlier champions, newest last (None: the base model): what `rollback` goes back to."""
    paths: dict[str, str] = Field(default_factory=dict)
    epoch: int = 0
    updated_at: float = 0.0

    def served(self) -> list[str]:
        """Adapters requests may be sent to."""
        return [n for n in (self.champion, self.challenger) if n]

    def previous(self) -> str | None:
        return self.history[-1] if self.history else None


async def load_routing(redis: Redis) -> Routing:
    raw = await redis.get(ROUTING_KEY)
    return Routing.model_validate_json(raw) if raw else Routing()


async def registered_backends(redis: Redis, max_age_s: float = 15.0) -> list[str]:
    """vLLM base URLs that a live gateway listed as healthy within `max_age_s`."""
    urls: list[bytes] = await redis.zrangebyscore(BACKENDS_KEY, time.time() - max_age_s, "+inf")  # type: ignore[assignment]
    return [u.decode() for u in urls]


# -- talking to vLLM --------------------------------------------------------------------------------


class VllmAdmin:
    """vLLM's runtime LoRA endpoints and a probe request."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}

    async def load(self, url: str, name: str, path: str) -> None:
        resp = await self._post(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        # Names are immutable, so "already loaded" means these very weights are there.
        if resp.status_code != 200 and "already been loaded" not in resp.text:
            raise AdapterError(f"vLLM at {url} did not load {name}: {resp.status_code} {resp.text[:300]}", 502)

    async def unload(self, url: str, name: str) -> None:
        resp = await self._post(f"{url}/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code not in (200, 404):
            raise AdapterError(f"vLLM at {url} did not unload {name}: {resp.status_code} {resp.text[:300]}", 502)

    async def probe(self, url: str, name: str) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        resp = await self._post(f"{url}/v1/chat/completions", body)
        if resp.status_code != 200:
            raise AdapterError(f"{name} on {url} failed its probe: {resp.status_code} {resp.text[:300]}", 502)

    async def _post(self, url: str, body: dict[str, object]) -> httpx.Response:
        try:
            return await self.client.post(url, json=body, headers=self.headers, timeout=60.0)
        except httpx.HTTPError as exc:
            raise AdapterError(f"could not reach vLLM at {url}: {exc!r}", 502) from exc


# -- swaps ------------------------------------------------------------------------------------------


@dataclass
class SwapResult:
    before: Routing
    after: Routing
    load_s: float
    """Time spent loading and probing, before the record was written."""


async def swap(
    redis: Redis,
    admin: VllmAdmin,
    backends: list[str],
    change: Callable[[Routing], Routing],
) -> SwapResult:
    """Apply `change` to the routing record once every adapter it serves is loaded and probed everywhere."""
    for _ in range(5):
        before = await load_routing(redis)
        after = change(before.model_copy(deep=True))
        if after.served() and not backends:
            raise AdapterError("no vLLM backend is registered (is a gateway running?)", 503)
        started = time.perf_counter()
        for name in after.served():
            path = after.paths.get(name)
            if path is None:
                raise AdapterError(f"no directory is known for adapter {name}", 404)
            for url in backends:
                await admin.load(url, name, path)
                await admin.probe(url, name)
        load_s = time.perf_counter() - started
        after.epoch = before.epoch + 1
        after.updated_at = time.time()
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(ROUTING_KEY)
                raw = await pipe.get(ROUTING_KEY)
                current = Routing.model_validate_json(raw) if raw else Routing()
                if current.epoch != before.epoch:
                    continue  # another swap won the race: start over from its record
                pipe.multi()
                pipe.set(ROUTING_KEY, after.model_dump_json())
                await pipe.execute()
            except WatchError:
                continue
        log.info("routing: champion %s, challenger %s (epoch %d)", after.champion, after.challenger, after.epoch)
        return SwapResult(before, after, load_s)
    raise AdapterError("the routing record kept changing under this swap; try again", 409)


def promoting(name: str, path: str) -> Callable[[Routing], Routing]:
    def change(r: Routing) -> Routing:
        if r.champion == name:
            raise AdapterError(f"{name} is the champion already")
        r.history = [*r.history, r.champion][-HISTORY_LIMIT:]
        r.champion = name
        if r.challenger == name:
            r.challenger = None
        r.paths = {n: p for n, p in r.paths.items() if n in {*r.history, r.challenger}} | {name: path}
        return r

    return change


def rolling_back(r: Routing) -> Routing:
    if not r.history:
        raise AdapterError("there is no earlier champion to roll back to")
    r.champion = r.history.pop()
    r.challenger = None
    return r


def challenging(name: str, path: str, ab_fraction: float) -> Callable[[Routing], Routing]:
    def change(r: Routing) -> Routing:
        if r.champion == name:
            raise AdapterError(f"{name} is the champion already")
        r.challenger = name
        r.ab_fraction = ab_fraction
        r.paths[name] = path
        return r

    return change


def unchallenged(r: Routing) -> Routing:
    r.challenger = None
    return r


# -- the gateway's side -----------------------------------------------------------------------------


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
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.admin = admin
        self.poll_s = poll_s
        self.max_loras = max_loras
        self.unload_grace_s = unload_grace_s
        self._unneeded: dict[str, float] = {}
        """When this gateway first saw a loaded adapter it does not need (grace before unloading it)."""
        self.routing = Routing()
        self.in_flight: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._registered = 0.0
        self._lock = asyncio.Lock()

    # choices

    def choose(self, n: int, base: str) -> list[str]:
        """The vLLM model name of each of `n` choices: the champion, or for a share of pairs, champion and
        challenger on random sides."""
        r = self.routing
        champion = r.champion or base
        if n == 2 and r.challenger and r.ab_fraction > 0 and random.random() < r.ab_fraction:
            pair = [champion, r.challenger]
            random.shuffle(pair)
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
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except (RedisError, OSError, AdapterError, ValueError) as exc:
                log.warning("adapter routing: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def sync(self) -> None:
        """One pass: register the backends, follow a changed record, reload after restarts, unload."""
        async with self._lock:
            healthy = [b for b in self.pool.backends if b.healthy]
            now = time.time()
            if healthy and now - self._registered > 1.0:
                await self.redis.zadd(BACKENDS_KEY, {b.url: now for b in healthy})
                self._registered = now
            desired = await load_routing(self.redis)
            for backend in healthy:
                for name in desired.served():
                    if name not in backend.models:
                        await self._load(backend, name, desired.paths[name])
            if desired.epoch != self.routing.epoch:
                log.info("serving champion %s, challenger %s", desired.champion, desired.challenger)
                self.routing = desired
            await self._unload(healthy)

    async def _load(self, backend: Backend, name: str, path: str) -> None:
        await self.admin.load(backend.url, name, path)
        backend.models = [*backend.models, name]

    async def ensure(self, backend: Backend, name: str) -> None:
        """Load a served adapter on `backend` if it lacks it (a backend that restarted, before the next pass)."""
        path = self.routing.paths.get(name)
        if path is None:
            raise AdapterError(f"no directory is known for adapter {name}", 503)
        await self._load(backend, name, path)

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

    async def promote_local(self, change: Callable[[Routing], Routing]) -> SwapResult:
        """A swap through this gateway's own backends, followed at once (no poll delay)."""
        urls = [b.url for b in self.pool.backends if b.healthy]
        result = await swap(self.redis, self.admin, urls, change)
        async with self._lock:
            for backend in self.pool.backends:
                if backend.healthy:
                    backend.models = sorted({*backend.models, *result.after.served()})
            self.routing = result.after
        return result


def routing_json(r: Routing) -> dict[str, object]:
    return json.loads(r.model_dump_json())
