"""Promote, roll back, challenge, retire: one call changes what is served (the routing record in Redis,
through `serving.adapters.swap`) and records it in the adapter registry (SQL).

The swap comes first: if vLLM cannot load or serve the adapter, the registry is left as it was. The live
A/B test (`evaluate_ab`) counts pairwise votes on pairs where the challenger played, and decides with a
Wilson interval on its win rate (ties and `both_bad` carry no preference and are not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import Engine, and_, or_, select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback
from serving.adapters import (
    AdapterError,
    Routing,
    SwapResult,
    VllmAdmin,
    challenging,
    load_routing,
    promoting,
    registered_backends,
    rolling_back,
    swap,
    unchallenged,
)
from trainer import registry

Swapper = Callable[[Callable[[Routing], Routing]], Awaitable[SwapResult]]


@contextlib.asynccontextmanager
async def remote_loop(redis_url: str, store: Engine) -> AsyncIterator[Loop]:
    """A `Loop` that swaps through the vLLM backends running gateways registered in Redis: the way of the
    training worker and of `pairloop adapters`."""
    async with Redis.from_url(redis_url, socket_connect_timeout=5) as client, httpx.AsyncClient() as http:
        yield Loop(client, store, remote_swapper(client, VllmAdmin(http)))


def remote_swapper(redis: Redis, admin: VllmAdmin) -> Swapper:
    """Swaps through the vLLM backends that running gateways registered in Redis."""

    async def run(change: Callable[[Routing], Routing]) -> SwapResult:
        return await swap(redis, admin, await registered_backends(redis), change)

    return run


@dataclass
class AbResult:
    wins: int
    losses: int
    lower: float
    upper: float
    decision: str
    """`promote`, `retire` or `wait`."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "wins": self.wins,
            "losses": self.losses,
            "lower": self.lower,
            "upper": self.upper,
            "decision": self.decision,
        }


def wilson(wins: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a win rate (0, 1 with no votes)."""
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ab_votes(session: Session, challenger: str) -> tuple[int, int]:
    """(wins, losses) of `challenger` in pairwise votes on pairs it played in against another adapter."""
    query = (
        select(Feedback.preference, Completion.adapter_a, Completion.adapter_b)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(
            Feedback.kind == "pairwise",
            Feedback.preference.in_(("0", "1")),
            or_(
                and_(Completion.adapter_a == challenger, Completion.adapter_b != challenger),
                and_(Completion.adapter_b == challenger, Completion.adapter_a != challenger),
            ),
        )
    )
    wins = losses = 0
    for preference, a, b in session.execute(query):
        winner = a if preference == "0" else b
        if winner == challenger:
            wins += 1
        else:
            losses += 1
    return wins, losses


class Loop:
    """The control surface of the learning loop, shared by the admin API, the CLI and the training worker."""

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

    async def evaluate_ab(self, min_votes: int, confidence: float, max_votes: int | None = None) -> AbResult | None:
        """Promote the challenger once its win rate's lower bound passes 0.5 (with `min_votes` votes), retire
        it once the upper bound falls below 0.5, or when `max_votes` votes have not shown it better. None when
        there is no challenger."""
        routing = await self.routing()
        challenger = routing.challenger
        if not challenger:
            return None

        def count() -> tuple[int, int]:
            with Session(self.store) as session:
                return ab_votes(session, challenger)

        wins, losses = await asyncio.to_thread(count)
        lower, upper = wilson(wins, wins + losses, confidence)
        decision = "wait"
        if lower > 0.5 and wins + losses >= min_votes:
            decision = "promote"
            await self.promote(
                challenger, f"won the live A/B test: {wins}-{losses}, interval [{lower:.3f}, {upper:.3f}]"
            )
        elif upper < 0.5:
            decision = "retire"
            await self.retire_challenger(
                f"lost the live A/B test: {wins}-{losses}, interval [{lower:.3f}, {upper:.3f}]"
            )
        elif max_votes is not None and wins + losses >= max_votes:
            decision = "retire"
            await self.retire_challenger(
                f"no clear win in {wins + losses} live votes: {wins}-{losses}, interval [{lower:.3f}, {upper:.3f}]"
            )
        return AbResult(wins, losses, round(lower, 4), round(upper, 4), decision)
