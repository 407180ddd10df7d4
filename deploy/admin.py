"""The learning loop's admin API (scope `admin`): adapters, promotion, rollback, training rounds.

    GET  /admin/adapters                 routing (champion, challenger, A/B share) and every version
    POST /admin/adapters/{name}/promote  load NAME everywhere, probe it, make it the champion
    POST /admin/adapters/rollback        the previous champion back
    POST /admin/train                    queue a training round (409 if one is queued or running)
    GET  /admin/train                    the latest rounds and their gate decisions

Swaps made here go through this gateway's own backends and take effect in this gateway at once; other
replicas follow the routing record within their poll interval.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from serving.adapters import AdapterError, AdapterRouter, Routing, SwapResult, routing_json
from serving.api import require
from serving.auth import Principal
from serving.errors import InvalidRequest
from trainer import registry
from trainer.errors import RoundBusy
from trainer.settings import TrainerSettings
from workers import training
from workers.promotion import Loop

router = APIRouter(prefix="/admin")
Admin = Annotated[Principal, require("admin")]
NAME = re.compile(r"^pl-v\d{4,}-[0-9a-f]{8}$")


def _loop(request: Request) -> Loop:
    adapters: AdapterRouter = request.app.state.adapters
    return Loop(request.app.state.redis, request.app.state.store, adapters.promote_local)


LoopDep = Annotated[Loop, Depends(_loop)]


def _swap_body(result: SwapResult) -> dict[str, Any]:
    return {"before": routing_json(result.before), "routing": routing_json(result.after), "load_s": result.load_s}


def _error(exc: AdapterError) -> JSONResponse:
    kind = {404: "not_found_error", 409: "conflict_error"}.get(exc.status, "upstream_error")
    return JSONResponse({"error": {"message": exc.message, "type": kind}}, status_code=exc.status)


@router.get("/adapters")
async def list_adapters(_: Admin, loop: LoopDep) -> dict[str, Any]:
    routing: Routing = await loop.routing()

    def read() -> list[dict[str, Any]]:
        with Session(loop.store) as session:
            return [a.as_dict() for a in registry.listing(session)]

    return {"routing": routing_json(routing), "adapters": await asyncio.to_thread(read)}


@router.post("/adapters/rollback", response_model=None)
async def rollback(_: Admin, loop: LoopDep) -> dict[str, Any] | JSONResponse:
    try:
        return _swap_body(await loop.rollback())
    except AdapterError as exc:
        return _error(exc)


@router.post("/adapters/{name}/promote", response_model=None)
async def promote(name: str, _: Admin, loop: LoopDep) -> dict[str, Any] | JSONResponse:
    if not NAME.match(name):
        raise InvalidRequest(f"not an adapter name: {name[:80]!r} (expected pl-vNNNN-xxxxxxxx)", param="name")
    try:
        return _swap_body(await loop.promote(name))
    except AdapterError as exc:
        return _error(exc)


def _trainer(request: Request) -> TrainerSettings:
    settings: TrainerSettings = request.app.state.trainer_settings
    return settings


@router.post("/train", status_code=202, response_model=None)
async def start_round(request: Request, _: Admin) -> dict[str, Any] | JSONResponse:
    settings = _trainer(request)
    url = request.app.state.settings.redis_url

    def enqueue() -> str:
        with redis.Redis.from_url(url) as connection:
            return training.enqueue_round(connection, settings, "manual").id

    try:
        job = await asyncio.to_thread(enqueue)
    except RoundBusy as exc:
        return JSONResponse({"error": {"message": exc.message, "type": "conflict_error"}}, status_code=409)
    return {"job": job, "queue": settings.training_queue, "status": "queued"}


@router.get("/train")
async def list_rounds(_: Admin, loop: LoopDep) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with Session(loop.store) as session:
            return [r.as_dict() for r in registry.rounds(session)]

    return {"rounds": await asyncio.to_thread(read)}
