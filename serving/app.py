"""The gateway application: `create_app(settings)` wires settings, Redis, the vLLM pool and the routes."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import httpx
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from serving import redis_client
from serving.adapters.router import AdapterRouter
from serving.adapters.vllm_admin import VllmAdmin
from serving.api import router
from serving.auth import KeyRing
from serving.backends import BackendPool
from serving.chat import ChatService
from serving.errors import REFUSALS, ErrorResponse, install_handlers
from serving.metrics import Metrics
from serving.middleware import Authenticate, BodyLimit, RequestMetrics
from serving.ratelimit import RateLimiter
from serving.redis_memory import RedisMemory
from serving.services import Gateway, Services
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

Extension = Callable[[Gateway, Services], AbstractAsyncContextManager[None]]
"""Runs inside the gateway's lifespan once its `Gateway` is built, and adds its own service to the app's
`Services` for as long as it runs: how later stages (the feedback API) join without the gateway importing them."""


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made resolvable and true to the answers: schemas that a route inlined with `$defs`
    (feedback's union of kinds) moved into `components`, and FastAPI's own 422 body (`{"detail": …}`, which this
    server never sends) replaced by the error shape it does send."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=API_DESCRIPTION, routes=app.routes)
    text = json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/')
    text = text.replace('"#/components/schemas/HTTPValidationError"', '"#/components/schemas/ErrorResponse"')
    schema = json.loads(text)
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def hoist(node: Any) -> None:
        if isinstance(node, dict):
            components.update(node.pop("$defs", {}))
            for value in node.values():
                hoist(value)
        elif isinstance(node, list):
            for value in node:
                hoist(value)

    hoist(schema["paths"])
    components.update(TypeAdapter(ErrorResponse).json_schema(ref_template="#/components/schemas/{model}").pop("$defs"))
    components["ErrorResponse"] = TypeAdapter(ErrorResponse).json_schema(ref_template="#/components/schemas/{model}")
    components["ErrorResponse"].pop("$defs", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for operation in (op for ops in schema["paths"].values() for op in ops.values()):
        if "422" in operation.get("responses", {}):
            operation["responses"]["422"]["description"] = REFUSALS[422]
    app.openapi_schema = schema
    return schema


API_DESCRIPTION = (
    "Two sampled answers per chat request (OpenAI's chat completions, with a `pairloop` object naming each "
    "choice's adapter and a feedback token), preferences back through /v1/feedback, and the learning loop's "
    "admin routes. Every error, of every route, is OpenAI's error shape (ErrorResponse)."
)


def create_app(
    settings: ServingSettings, *, vllm_urls: list[str] | None = None, extensions: Sequence[Extension] = ()
) -> FastAPI:
    """The gateway over the vLLM servers at `vllm_urls` (default: `settings.vllm_urls`).

    `settings.redis_url` and `settings.secret` must be set (`pairloop up` fills them in for the embedded
    default); the app refuses to start otherwise rather than serve completions nobody can give feedback on.
    """
    urls = vllm_urls or settings.vllm_urls
    if not urls:
        raise ValueError("no vLLM backend: set PAIRLOOP_VLLM_URLS, or start the gateway with `pairloop up`")
    if not settings.redis_url or not settings.secret:
        raise ValueError("the gateway needs PAIRLOOP_REDIS_URL and PAIRLOOP_SECRET")
    metrics = Metrics()
    keyring = KeyRing(settings.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert settings.redis_url and settings.secret
        # aiohttp rather than httpx for the upstream calls: its C HTTP parser cost about a third of httpx's
        # per-request CPU here, which shows in the gateway's added latency (docs/PERFORMANCE.md).
        timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_s, connect=5.0)
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
            redis = redis_client.connect(settings.redis_url)
            vllm_key = settings.vllm_key()
            headers = {"Authorization": f"Bearer {vllm_key}"} if vllm_key else {}
            pool = BackendPool(
                urls,
                client,
                interval_s=settings.health_interval_s,
                retry_after_s=settings.retry_after_s,
                headers=headers,
                discovery_s=settings.vllm_discovery_s,
            )
            admin_client = httpx.AsyncClient()
            adapters = AdapterRouter(
                redis,
                pool,
                VllmAdmin(admin_client, headers),
                poll_s=settings.adapter_poll_s,
                max_loras=settings.vllm_max_loras,
                unload_grace_s=settings.adapter_unload_grace_s,
            )
            memory = RedisMemory(
                redis,
                chat_limit=settings.redis_chat_limit,
                feedback_limit=settings.redis_feedback_limit,
                retry_after_s=settings.retry_after_s,
            )
            gateway = Gateway(
                settings=settings,
                metrics=metrics,
                keyring=keyring,
                redis=redis,
                limiter=RateLimiter(redis, settings.rate_limits(), retry_after_s=settings.retry_after_s),
                memory=memory,
                chat=ChatService(
                    settings,
                    pool,
                    client,
                    redis,
                    metrics,
                    settings.token_secrets()[0],
                    router=adapters,
                    memory=memory,
                ),
                adapters=adapters,
            )
            if keyring.open:
                log.warning(
                    "no API keys configured: listening on loopback only (%s) and accepting requests without a key",
                    settings.host,
                )
            await pool.probe_all()
            await adapters.try_sync()  # ready the backends that are up before the first request (the loop retries)
            pool.start()
            adapters.start()
            await memory.start()
            # Everything imported and built so far lives as long as the process: keep it out of the garbage
            # collector's full passes, which otherwise scan it all and stall the requests in flight
            # (bench/feedback.py: p99 from about 155 to 105 ms).
            gc.freeze()
            services.add(gateway)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    for extension in extensions:
                        await stack.enter_async_context(extension(gateway, services))
                    yield
            finally:
                services.remove(Gateway)
                await memory.stop()
                await adapters.stop()
                await pool.stop()
                await admin_client.aclose()
                await redis.aclose()

    # No docs page here: deploy/app/pages.py serves Swagger UI from local files (FastAPI's loads it from a CDN).
    app = FastAPI(title="pairloop", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    services = Services()
    app.state.services = services
    install_handlers(app, metrics)
    app.include_router(router)
    app.openapi = functools.partial(openapi_document, app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics)  # counts the 413s and 408s of BodyLimit too
    app.add_middleware(Authenticate, keyring=keyring)  # outermost: the caller is known before any body is read
    return app
