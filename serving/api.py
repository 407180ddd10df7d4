"""HTTP routes of the gateway. Each route is short: the work is in `ChatService`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from serving.auth import Principal
from serving.chat import ChatService
from serving.errors import responses
from serving.protocol import ChatCompletionRequest
from serving.services import Gateway, service, services_of

router = APIRouter()


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, and those
# thread hops were a measurable share of the gateway's added latency.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key of PAIRLOOP_API_KEYS: `Authorization: Bearer <key>`; each route needs one scope.",
)
"""The security scheme in the OpenAPI document; the key itself is checked by the keyring, with its own errors."""


async def _principal(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None
) -> Principal:
    known: Principal | None = getattr(request.state, "principal", None)  # set by serving.middleware.Authenticate
    if known is not None:
        return known
    return services_of(request.app).get(Gateway).keyring.authenticate(request.headers.get("authorization"))


GatewayDep = Annotated[Gateway, service(Gateway)]


async def _chat_service(gateway: GatewayDep) -> ChatService:
    return gateway.chat


def require(scope: str) -> Any:
    """A dependency that authenticates the caller and checks one scope."""

    async def dependency(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        principal.require(scope)  # type: ignore[arg-type]
        return principal

    return Depends(dependency)


ChatCaller = Annotated[Principal, require("chat")]
ChatServiceDep = Annotated[ChatService, Depends(_chat_service)]


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "The completion (OpenAI's shape, with `pairloop` holding the choices' adapters and the "
            "feedback token), or with `stream: true` its server-sent events, errors included as "
            '`data: {"error": …}` chunks.',
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **responses(400, 401, 403, 404, 413, 422, 429, 500, 503),
    },
)
async def chat_completions(
    body: ChatCompletionRequest, caller: ChatCaller, service: ChatServiceDep, gateway: GatewayDep
) -> Response:
    await gateway.limiter.take("chat", caller.key_id, body.user)
    if body.stream:
        stream = await service.open_stream(body, caller)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    # Serialized here, not by FastAPI: the dict is plain JSON already, and jsonable_encoder's walk over it
    # is a measurable part of the gateway's added latency (docs/PERFORMANCE.md).
    payload = json.dumps(await service.complete(body, caller), separators=(",", ":"))
    return Response(payload, media_type="application/json")


@router.get("/v1/models", responses=responses(401, 403, 500))
async def list_models(_: ChatCaller, service: ChatServiceDep) -> dict[str, Any]:
    name = service.public_model()
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "pairloop"}],
    }


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it says nothing about vLLM or Redis: see /readyz)."""
    return {"status": "ok"}


_READINESS = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "redis": {"type": "boolean"},
        "backends_healthy": {"type": "integer"},
        "backends_ready": {"type": "integer"},
        "backends": {"type": "integer"},
    },
    "required": ["status", "redis", "backends_healthy", "backends_ready", "backends"],
}


@router.get(
    "/readyz",
    responses={
        200: {"description": "Ready.", "content": {"application/json": {"schema": _READINESS}}},
        503: {
            "description": "Not ready: Redis does not answer or no vLLM backend takes requests (same body).",
            "content": {"application/json": {"schema": _READINESS}},
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        },
    },
)
async def readyz(service: ChatServiceDep) -> JSONResponse:
    """Ready when Redis answers and at least one vLLM backend takes requests (it passed its last probe and holds
    the served adapters)."""
    try:
        redis_ok = bool(await asyncio.wait_for(service.redis.ping(), timeout=2.0))
    except (RedisError, OSError, TimeoutError):
        redis_ok = False
    healthy = sum(b.healthy for b in service.pool.backends)
    serving = service.pool.ready
    ready = redis_ok and serving
    body = {
        "status": "ready" if ready else "not ready",
        "redis": redis_ok,
        "backends_healthy": healthy,
        "backends_ready": sum(b.healthy and b.ready and not b.draining for b in service.pool.backends),
        "backends": len(service.pool.backends),
    }
    headers = {} if ready else {"Retry-After": str(service.settings.retry_after_s)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@router.get("/admin/backends", responses=responses(401, 403, 500))
async def backends(_: Annotated[Principal, require("admin")], service: ChatServiceDep) -> dict[str, Any]:
    """This gateway's vLLM backends: where each came from, whether it takes requests, what it holds."""
    return {
        "backends": [
            {
                "url": b.url,
                "source": b.source,
                "healthy": b.healthy,
                "ready": b.ready,
                "draining": b.draining,
                "in_flight": b.in_flight,
                "models": b.models,
            }
            for b in service.pool.backends
        ]
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format.",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(service: ChatServiceDep, gateway: GatewayDep) -> Response:
    m = gateway.metrics
    m.backends_healthy.set(sum(b.healthy for b in service.pool.backends))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
