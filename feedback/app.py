"""How the feedback API joins the gateway: its routes and an extension that owns its resources."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from feedback.api import router
from feedback.queue import FeedbackQueue
from feedback.service import Feedback, FeedbackService
from feedback.settings import FeedbackSettings
from feedback.store import make_engine
from serving.app import Extension
from serving.services import Gateway, Services

__all__ = ["extension", "router"]


def extension(feedback: FeedbackSettings) -> Extension:
    """Starts the feedback service inside the gateway's lifespan (include `router` in the app as well)."""

    @contextlib.asynccontextmanager
    async def run(gateway: Gateway, services: Services) -> AsyncIterator[None]:
        settings = gateway.settings
        queue = FeedbackQueue(
            gateway.redis,
            feedback,
            wait_aof=feedback.feedback_durability == "aof",
            waitaof_timeout_ms=feedback.feedback_waitaof_timeout_ms,
        )
        service = FeedbackService(
            feedback,
            gateway.redis,
            queue,
            gateway.limiter,
            settings.token_secrets(),
            gateway.metrics.registry,
            retry_after_s=settings.retry_after_s,
            memory=gateway.memory,
        )
        store = make_engine(feedback.store_url())
        services.add(Feedback(feedback, service, store))
        try:
            yield
        finally:
            services.remove(Feedback)
            store.dispose()

    return run
