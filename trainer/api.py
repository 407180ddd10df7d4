"""The learning loop's admin routes (scope `admin`): adapters, promotion, rollback, training rounds.

    GET  /admin/adapters                 routing (champion, challenger, A/B share) and every version
    POST /admin/adapters/{name}/promote  load NAME everywhere, probe it, make it the champion
    POST /admin/adapters/rollback        the previous champion back
    POST /admin/train                    queue a training round (409 if one is queued or running)
    GET  /admin/train                    the latest rounds, their gate decisions, and the backlog
    GET  /admin/leaderboard              every variant that ever served, ranked (Bradley-Terry, bootstrap intervals)

Swaps made here go through this gateway's own backends and take effect in this gateway at once; other
replicas follow the routing record within their poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from feedback.api import FeedbackDep
from serving import redis_client
from serving.adapters.routing import Routing, SwapResult, routing_json
from serving.api import GatewayDep, require
from serving.app import Extension
from serving.auth import Principal
from serving.errors import Conflict, InvalidRequest, responses
from serving.services import Gateway, Services, service
from trainer import leaderboard, registry
from trainer.data import backlog
from trainer.errors import RoundBusy
from trainer.promotion import Promotions
from trainer.queue import enqueue_round
from trainer.settings import TrainerSettings

router = APIRouter(prefix="/admin", responses=responses(401, 403, 500, 503))
Admin = Annotated[Principal, require("admin")]
NAME = re.compile(r"^pl-v\d{4,}-[0-9a-f]{8}$")


@dataclass(frozen=True)
class LoopAdmin:
    """The loop's admin routes' own services in a running gateway (`extension` adds them to the app)."""

    settings: TrainerSettings
    connection: redis.Redis
    """A blocking client (serving.redis_client's) for RQ's queues, which take no asyncio client."""


def extension(settings: TrainerSettings) -> Extension:
    """Adds `LoopAdmin` to the gateway for as long as it runs (include `router` in the app as well)."""

    @contextlib.asynccontextmanager
    async def run(gateway: Gateway, services: Services) -> AsyncIterator[None]:
        connection = redis_client.connect_sync(gateway.settings.redis_url or "")
        services.add(LoopAdmin(settings, connection))
        try:
            yield
        finally:
            services.remove(LoopAdmin)
            connection.close()

    return run


LoopAdminDep = Annotated[LoopAdmin, service(LoopAdmin)]


async def _promotions(gateway: GatewayDep, feedback: FeedbackDep) -> Promotions:
    return Promotions(gateway.redis, feedback.store, gateway.adapters.swap)


PromotionsDep = Annotated[Promotions, Depends(_promotions)]


def _swap_body(result: SwapResult) -> dict[str, Any]:
    return {"before": routing_json(result.before), "routing": routing_json(result.after), "load_s": result.load_s}


@router.get("/adapters")
async def list_adapters(_: Admin, promotions: PromotionsDep) -> dict[str, Any]:
    routing: Routing = await promotions.routing()

    def read() -> list[dict[str, Any]]:
        with Session(promotions.store) as session:
            return [a.as_dict() for a in registry.listing(session)]

    return {"routing": routing_json(routing), "adapters": await asyncio.to_thread(read)}


@router.post("/adapters/rollback", responses=responses(409, 502))
async def rollback(_: Admin, promotions: PromotionsDep) -> dict[str, Any]:
    """The previous champion back (AdapterError, in OpenAI's shape, when there is none)."""
    return _swap_body(await promotions.rollback())


@router.post("/adapters/{name}/promote", responses=responses(400, 404, 409, 502))
async def promote(name: str, _: Admin, promotions: PromotionsDep) -> dict[str, Any]:
    if not NAME.match(name):
        raise InvalidRequest(f"not an adapter name: {name[:80]!r} (expected pl-vNNNN-xxxxxxxx)", param="name")
    return _swap_body(await promotions.promote(name))


@router.post("/train", status_code=202, responses=responses(409))
async def start_round(_: Admin, loop: LoopAdminDep) -> dict[str, Any]:
    settings = loop.settings

    def enqueue() -> str:
        return enqueue_round(loop.connection, settings, "manual").id

    try:
        job = await asyncio.to_thread(enqueue)
    except RoundBusy as exc:
        raise Conflict(exc.message, code="round_busy") from exc
    return {"job": job, "queue": settings.training_queue, "status": "queued"}


@router.get("/train")
async def list_rounds(_: Admin, promotions: PromotionsDep, loop: LoopAdminDep) -> dict[str, Any]:
    """The latest rounds, and the backlog: the pending examples the next round would take."""
    settings = loop.settings

    def read() -> dict[str, Any]:
        with Session(promotions.store) as session:
            return {"rounds": [r.as_dict() for r in registry.rounds(session)], "backlog": backlog(session, settings)}

    return await asyncio.to_thread(read)


@router.get("/leaderboard", responses=responses(422))
async def get_leaderboard(
    _: Admin, promotions: PromotionsDep, bootstrap: Annotated[int, Query(ge=0, le=2000)] = 200
) -> dict[str, Any]:
    """The base model and every adapter that served, ranked on all pairwise votes between two of them."""

    def read() -> dict[str, Any]:
        with Session(promotions.store) as session:
            return leaderboard.from_store(session, bootstrap=bootstrap)

    return await asyncio.to_thread(read)
