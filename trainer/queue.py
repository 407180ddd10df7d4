"""Training rounds, producer side: the queue the training worker takes them from, and the one-round lock.

One round at a time: a round holds `pairloop:training:lock`, a Redis key whose TTL is `round_timeout_s`, so
a round that crashed cannot hold it forever. The round itself runs in `workers/training.py`
(`workers.training.train_round`, the name RQ stores with each job).
"""

from __future__ import annotations

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from trainer.errors import RoundBusy
from trainer.settings import TrainerSettings

LOCK_KEY = "pairloop:training:lock"
ROUND_FUNCTION = "workers.training.train_round"


def training_queue(connection: redis.Redis, settings: TrainerSettings) -> Queue:
    return Queue(settings.training_queue, connection=connection, serializer=JSONSerializer)


def round_pending(connection: redis.Redis, settings: TrainerSettings) -> bool:
    """A round is queued or running."""
    return bool(connection.exists(LOCK_KEY)) or training_queue(connection, settings).count > 0


def enqueue_round(connection: redis.Redis, settings: TrainerSettings, trigger: str) -> Job:
    """Queue a round for the training worker; `RoundBusy` if one is queued or running already."""
    if round_pending(connection, settings):
        raise RoundBusy("a training round is queued or running already")
    return training_queue(connection, settings).enqueue(
        ROUND_FUNCTION,
        kwargs={"trigger": trigger},
        job_timeout=settings.round_timeout_s,
        result_ttl=7 * 24 * 3600,
        failure_ttl=30 * 24 * 3600,
    )
