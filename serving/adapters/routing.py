"""Which LoRA adapter serves: the routing record in Redis, its transitions, and the swap protocol.

The routing record (`pairloop:routing`, JSON) names the champion (None: the base model), an optional
challenger with the share of pairs it plays in (`ab_fraction`), earlier champions for rollback, and each
adapter's path: a directory on a disk every vLLM server shares, or `store:<name>` for an adapter in the
adapter store, which each vLLM host's sidecar copies to its own disk (`serving/adapters/hosts.py`).
Every gateway replica follows the same record (`serving/adapters/router.py`), so they agree on what is served.

A swap (`swap` with one of the transitions `promoting`, `rolling_back`, `challenging`, `unchallenged`)
first loads every adapter the new record serves into every vLLM backend and checks each with a one-token
probe request, and only then writes the record (optimistically: a concurrent swap makes it start over).
Adapters are loaded under their immutable version names and never reloaded under a name already loaded:
vLLM's same-name reloads have open bugs (stale prefix-cache KV, weights changing mid-generation;
docs/STACK.md).

Swaps can run anywhere that reaches Redis and the vLLM servers (the gateway's admin API, the training
worker, `pairloop adapters`): gateways list their backends in Redis (`pairloop:vllm-backends`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import WatchError

from serving.adapters.hosts import host_path
from serving.adapters.vllm_admin import VllmAdmin
from serving.errors import AdapterError

log = logging.getLogger(__name__)

ROUTING_KEY = "pairloop:routing"
BACKENDS_KEY = "pairloop:vllm-backends"
HISTORY_LIMIT = 10


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


async def registered_backends(redis: Redis, max_age_s: float = 5.0) -> list[str]:
    """vLLM base URLs that a live gateway listed as healthy within `max_age_s`."""
    urls: list[bytes] = await redis.zrangebyscore(BACKENDS_KEY, time.time() - max_age_s, "+inf")  # type: ignore[assignment]
    return [u.decode() for u in urls]


# -- swaps -----------------------------------------------------------------------------------------


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
                await admin.load(url, name, await host_path(redis, url, path))
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


def routing_json(r: Routing) -> dict[str, object]:
    return json.loads(r.model_dump_json())
