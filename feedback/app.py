"""How the feedback API joins the gateway: its routes and an extension that owns its resources."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from feedback.api import router
from feedback.queue import FeedbackQueue
from feedback.service import FeedbackService
from feedback.settings import FeedbackSettings
from feedback.store import make_engine
from serving.app import Extension

__all__ = ["extension", "router"]


def extension(feedback: FeedbackSettings) -> Extension:
    """Starts the feedback service inside the gateway's lifespan (include `router` in the app as well)."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        settings = app.state.settings
        queue = FeedbackQueue(
            app.state.redis,
            feedback,
            wait_aof=feedback.feedback_durability == "aof",
            waitaof_timeout_ms=feedback.feedback_waitaof_timeout_ms,
        )
        service = FeedbackService(
            feedback,
            app.state.redis,
            queue,
            app.state.limiter,
            settings.token_secrets(),
            app.state.metrics.registry,
            retry_after_s=settings.retry_after_s,
            memory=app.state.redis_memory,
        )
        app.state.feedback = service
        app.state.store = make_engine(feedback.store_url())
        try:
            yield
        finally:
            app.state.store.dispose()

    return run
