"""The whole HTTP service, assembled: the serving gateway with each package's routes mounted on it.

serving/api.py       /v1/chat/completions, /v1/models, /healthz, /readyz, /metrics
feedback/api.py      /v1/feedback, /v1/feedback/stats
trainer/api.py       /admin/adapters, /admin/adapters/{name}/promote, /admin/adapters/rollback, /admin/train
deploy/app/dashboard.py /admin/dashboard (what the dashboard page draws)
deploy/app/pages.py  / (the arena), /dashboard, /static/*

Each stage adds its typed service object to the app's `serving.services.Services` while the app runs: the
gateway's `Gateway`, feedback's `Feedback`, the loop's `LoopAdmin`; the routes reach them by class.
"""

from __future__ import annotations

from fastapi import FastAPI

from deploy.app import dashboard, pages
from feedback import app as feedback_app
from feedback.settings import FeedbackSettings
from serving.app import create_app
from serving.settings import ServingSettings
from trainer import api as trainer_api
from trainer.settings import TrainerSettings


def build_app(
    settings: ServingSettings,
    feedback: FeedbackSettings | None = None,
    *,
    vllm_urls: list[str] | None = None,
    trainer: TrainerSettings | None = None,
) -> FastAPI:
    """Gateway + feedback + the loop's admin API + the pages. The other packages' settings default to the
    environment, in the same data dir."""
    if not settings.redis_url:
        raise ValueError("the gateway needs PAIRLOOP_REDIS_URL (`pairloop up` starts an embedded one)")
    feedback = feedback or FeedbackSettings(data_dir=settings.data_dir)
    trainer = trainer or TrainerSettings(data_dir=settings.data_dir)
    stages = [feedback_app.extension(feedback), trainer_api.extension(trainer)]
    app = create_app(settings, vllm_urls=vllm_urls, extensions=stages)
    app.include_router(feedback_app.router)
    app.include_router(trainer_api.router)
    app.include_router(dashboard.router)
    pages.install(app)
    return app
