"""The whole HTTP service: the serving gateway with the feedback API installed."""

from __future__ import annotations

from fastapi import FastAPI

from deploy import admin, dashboard, web
from feedback import app as feedback_app
from feedback.settings import FeedbackSettings
from serving.app import create_app
from serving.settings import ServingSettings
from trainer.settings import TrainerSettings
from workers.settings import WorkerSettings


def build_app(
    settings: ServingSettings,
    feedback: FeedbackSettings | None = None,
    workers: WorkerSettings | None = None,
    *,
    vllm_urls: list[str] | None = None,
    trainer: TrainerSettings | None = None,
) -> FastAPI:
    """Gateway + feedback + the loop's admin API. The other packages' settings default to the environment,
    in the same data dir."""
    if not settings.redis_url:
        raise ValueError("the gateway needs PAIRLOOP_REDIS_URL (`pairloop up` starts an embedded one)")
    feedback = feedback or FeedbackSettings(data_dir=settings.data_dir)
    workers = workers or WorkerSettings(data_dir=settings.data_dir)
    app = create_app(
        settings,
        vllm_urls=vllm_urls,
        extensions=[feedback_app.extension(feedback, workers)],
    )
    app.include_router(feedback_app.router)
    app.state.trainer_settings = trainer or TrainerSettings(data_dir=settings.data_dir)
    app.state.worker_settings = workers
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    web.install(app)
    return app
