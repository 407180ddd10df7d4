"""`pairloop cron`: RQ 3's cron scheduler, enqueueing the learning loop's check (`trainer.loop.check`) on the
control queue every `check_interval_s`, once per interval however many schedulers run."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from rq import Queue
from rq.cron import CronJob, CronScheduler
from rq.job import Job
from rq.serializers import JSONSerializer

from serving.redis_client import connect_sync
from trainer.queue import CHECK_FUNCTION
from trainer.settings import TrainerSettings
from workers.runner import keep_running

log = logging.getLogger(__name__)

CRON_KEY = "pairloop:cron:"


class JsonCronJob(CronJob):
    """RQ's CronJob, enqueueing with the JSON serializer (RQ's default is pickle; the workers here read JSON
    only), once per interval however many `pairloop cron` run: each scheduler keeps its own clock, so two of them
    would each enqueue every interval. The first to claim the interval (`SET NX`, for 90% of it) enqueues;
    should it die, another claims the next one."""

    def enqueue(self, connection: redis.Redis) -> Job | None:  # type: ignore[override]
        interval_ms = int((self.interval or 60) * 1000)
        if not connection.set(f"{CRON_KEY}{self.queue_name}:{self.func_name}", "1", nx=True, px=interval_ms * 9 // 10):
            log.debug("cron: %s was enqueued by another scheduler this interval", self.func_name)
            return None
        queue = Queue(self.queue_name, connection=connection, serializer=JSONSerializer)
        job = queue.enqueue(self.func_name, args=self.args, kwargs=self.kwargs, **self.job_options)
        log.debug("cron: enqueued %s (%s)", self.func_name, job.id)
        return job


class _CronScheduler(CronScheduler):
    stop_signalled = False  # SIGINT/SIGTERM: `start` ended because it was asked to

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_signalled = True
        super()._request_stop(signum, frame)


def run_cron(redis_url: str, settings: TrainerSettings) -> None:
    """`pairloop cron`: RQ 3's cron scheduler, enqueueing the check every `check_interval_s`, until SIGTERM/SIGINT.

    RQ's scheduler ends on the first Redis error; here it waits for Redis and starts again (the same scheduler:
    its jobs keep their times)."""
    connection = connect_sync(redis_url)
    scheduler = _CronScheduler(connection, name=f"pairloop-cron-{uuid.uuid4().hex[:6]}")
    scheduler._cron_jobs.append(
        JsonCronJob(
            queue_name=settings.control_queue,
            func_name=CHECK_FUNCTION,
            interval=settings.check_interval_s,
            job_timeout=max(60, settings.check_interval_s * 4),
            result_ttl=600,
            failure_ttl=24 * 3600,
        )
    )
    keep_running(scheduler.start, lambda: scheduler.stop_signalled, connection.ping, what="cron")
