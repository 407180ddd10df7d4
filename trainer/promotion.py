"""The adapter registry's state machine: promote, roll back, challenge, retire, and the live A/B decision.

One call changes what is served (the routing record in Redis, through `serving.adapters.routing.swap`) and records it
in the adapter registry (SQL, `trainer/registry.py`). The swap comes first: if vLLM cannot load or serve the
adapter, the registry is left as it was. `Promotions` is used by the gateway's admin API, the CLI and the
training worker alike; `evaluate_ab` applies the rule of `trainer/ab.py` to the challenger's live record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from redis.asyncio import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from serving.adapters.routing import (
    Routing,
    SwapResult,
    challenging,
    load_routing,
    promoting,
    registered_backends,
    rolling_back,
    swap,
    unchallenged,
)
from serving.adapters.vllm_admin import VllmAdmin
from serving.errors import AdapterError
from serving.redis_client import connect
from trainer import registry
from trainer.ab import AbResult, ab_votes, decide

Swapper = Callable[[Callable[[Routing], Routing]], Awaitable[SwapResult]]


@contextlib.asynccontextmanager
async def remote_promotions(redis_url: str, store: Engine, vllm_key: str | None = None) -> AsyncIterator[Promotions]:
    """`Promotions` that swap through the vLLM backends running gateways registered in Redis: the way of the
    training worker and of `pairloop adapters`. `vllm_key`: the vLLM servers' API key, if they take one."""
    headers = {"Authorization": f"Bearer {vllm_key}"} if vllm_key else {}
    async with connect(redis_url) as client, httpx.AsyncClient() as http:
        yield Promotions(client, store, remote_swapper(client, VllmAdmin(http, headers)))


def remote_swapper(redis: Redis, admin: VllmAdmin) -> Swapper:
    """Swaps through the vLLM backends that running gateways registered in Redis."""

    async def run(change: Callable[[Routing], Routing]) -> SwapResult:
        return await swap(redis, admin, await registered_backends(redis), change)

    return run


class Promotions:
    """Changes what is served and records it: shared by the admin API, the CLI and the training worker."""

    def __init__(self, redis: Redis, store: Engine, swapper: Swapper) -> None:
        self.redis = redis
        self.store = store
        self.swapper = swapper

    async def routing(self) -> Routing:
        return await load_routing(self.redis)

    def _servable(self, session: Session, name: str) -> registry.Adapter:
        adapter = registry.get(session, name)
        if adapter is None:
            raise AdapterError(f"no adapter named {name}", 404)
        if adapter.status == "rejected":
            raise AdapterError(f"{name} was rejected by the gate and is never served: {adapter.reason}")
        return adapter

    async def _path(self, name: str) -> str:
        def read() -> str:
            with Session(self.store) as session:
                return self._servable(session, name).path

        return await asyncio.to_thread(read)

    async def _record(self, changes: list[tuple[str | None, registry.Status, str]]) -> None:
        """Set statuses in the registry, off the event loop (SQLite's fsync would stall a gateway's requests)."""

        def write() -> None:
            with Session(self.store) as session:
                for name, status, reason in changes:
                    if name and (adapter := registry.get(session, name)) is not None:
                        registry.set_status(session, adapter, status, reason)
                session.commit()

        await asyncio.to_thread(write)

    async def promote(self, name: str, reason: str = "promoted by hand") -> SwapResult:
        result = await self.swapper(promoting(name, await self._path(name)))
        await self._record([(result.before.champion, "retired", f"replaced by {name}"), (name, "champion", reason)])
        return result

    async def rollback(self) -> SwapResult:
        result = await self.swapper(rolling_back)
        await self._record(
            [
                (result.before.champion, "retired", "rolled back"),
                (result.after.champion, "champion", "restored by a rollback"),
                (result.before.challenger, "retired", "its champion was rolled back"),
            ]
        )
        return result

    async def challenge(self, name: str, ab_fraction: float) -> SwapResult:
        result = await self.swapper(challenging(name, await self._path(name), ab_fraction))
        old = result.before.challenger
        await self._record(
            [
                (old if old != name else None, "retired", f"superseded by challenger {name}"),
                (name, "challenger", "passed the offline gate"),
            ]
        )
        return result

    async def retire_challenger(self, reason: str) -> SwapResult:
        result = await self.swapper(unchallenged)
        await self._record([(result.before.challenger, "retired", reason)])
        return result

    async def evaluate_ab(self, min_votes: int, alpha: float, max_votes: int | None = None) -> AbResult | None:
        """Judge the challenger's live record (`trainer.ab.decide`) and act on it: promote it or retire it.
        None when there is no challenger."""
        routing = await self.routing()
        challenger = routing.challenger
        if not challenger:
            return None

        def count() -> tuple[int, int]:
            with Session(self.store) as session:
                return ab_votes(session, challenger)

        wins, losses = await asyncio.to_thread(count)
        result = decide(wins, losses, min_votes, alpha, max_votes)
        if result.decision == "promote":
            await self.promote(challenger, result.reason)
        elif result.decision == "retire":
            await self.retire_challenger(result.reason)
        return result
