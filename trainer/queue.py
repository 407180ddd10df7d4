"""Training rounds, producer side: the queue the training worker takes them from, and the one-round lock.

One round at a time: a round holds `pairloop:training:lock` (`RoundLock`), a Redis key with a short TTL that a
thread of the round renews while it runs. A round whose process was SIGKILLed stops renewing it, so the next
round can start `LOCK_TTL_S` later, not after the hour a round may take. The round itself runs in
`trainer/loop.py` (`trainer.loop.train_round`, the name RQ stores with each job).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import TracebackType

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from trainer.errors import RoundBusy
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

LOCK_KEY = "pairloop:training:lock"
LOCK_TTL_S = 30
"""How long the lock outlives the last renewal (renewed every third of it)."""
ROUND_FUNCTION = "trainer.loop.train_round"
CHECK_FUNCTION = "trainer.loop.check"

# KEYS: the lock. ARGV: its holder's token, then the new TTL in ms (renew) or nothing (release).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RoundLock:
    """The one-round lock, held while a thread renews it (`with RoundLock(connection):`).

    On entry it waits up to `wait_s` for the lock to be free, then raises `RoundBusy`: a round run again after its
    worker died finds the dead worker's lock until it lapses. Losing it while running (Redis lost the key) is
    logged: the round goes on, and a second round may then start beside it.
    """

    def __init__(self, connection: redis.Redis, ttl_s: float = LOCK_TTL_S, wait_s: float = 0.0) -> None:
        self.connection = connection
        self.ttl_ms = int(ttl_s * 1000)
        self.wait_s = wait_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RoundLock:
        deadline = time.monotonic() + self.wait_s
        while not self.connection.set(LOCK_KEY, self.token, nx=True, px=self.ttl_ms):
            if time.monotonic() >= deadline:
                raise RoundBusy("another training round holds the lock")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="round-lock", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.connection.eval(_RENEW, 1, LOCK_KEY, self.token, self.ttl_ms):
                    log.error("the training round lost its lock (the key expired or was taken)")
            except (redis.RedisError, OSError) as exc:
                log.warning("could not renew the training round lock: %s", exc)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.connection.eval(_RELEASE, 1, LOCK_KEY, self.token)


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
