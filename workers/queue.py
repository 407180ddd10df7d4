"""The feedback queue: RQ over Redis, with the JSON serializer and retries.

`FeedbackQueue.submit` is what the API calls for each event. In one Redis transaction it checks the
event's claims (its `feedback_id`, and the judge's vote on that completion), sets them, and enqueues the
RQ job; then it waits until Redis has fsynced that write to its append-only file (`WAITAOF`). So an
event is either queued durably with its claims, or not at all, and the API can answer 202 for it.

The calls are blocking (RQ is synchronous); the API runs them in a small thread pool. Each thread has its
own single-connection client, because `WAITAOF` waits for the writes of the connection it is sent on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError, WatchError
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from workers.settings import WorkerSettings

JOB_FUNCTION = "workers.jobs.store_feedback"
FAILURE_TTL_S = 30 * 24 * 3600


class QueueUnavailable(Exception):
    """Redis cannot be reached, or it could not make the event durable: nothing was acknowledged."""


@dataclass(frozen=True)
class Claim:
    """A key that must not exist yet; it is set to `value` for `ttl_s` together with the enqueue."""

    key: str
    value: str
    ttl_s: int


def make_queue(connection: redis.Redis, settings: WorkerSettings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


class FeedbackQueue:
    def __init__(
        self,
        redis_url: str,
        settings: WorkerSettings,
        *,
        wait_aof: bool = True,
        waitaof_timeout_ms: int = 2000,
        socket_timeout_s: float = 5.0,
    ) -> None:
        self.redis_url = redis_url
        self.settings = settings
        self.wait_aof = wait_aof
        self.waitaof_timeout_ms = waitaof_timeout_ms
        self.socket_timeout_s = socket_timeout_s
        self._local = threading.local()
        retries = settings.job_retry_intervals_s
        self._retry = Retry(max=len(retries), interval=retries) if retries else None

    def _thread_client(self) -> tuple[redis.Redis, Queue]:
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is None:
            pool = redis.BlockingConnectionPool.from_url(
                self.redis_url,
                max_connections=1,
                timeout=self.socket_timeout_s,
                socket_timeout=self.socket_timeout_s + self.waitaof_timeout_ms / 1000,
                socket_connect_timeout=2.0,
            )
            client = redis.Redis(connection_pool=pool)
            queue = make_queue(client, self.settings)
            # RQ asks the server's version while enqueueing; ask now, outside the transaction that holds
            # this thread's only connection.
            queue.get_redis_server_version()
            self._local.client, self._local.queue = client, queue
        return client, self._local.queue

    def submit(self, job_id: str, payload: dict[str, Any], claims: list[Claim]) -> dict[str, str | None] | None:
        """Enqueue `payload` as job `job_id` with its claims, durably; or, when a claim is taken, nothing.

        Returns None when the job was enqueued, else the current value of every claim key (None where
        free): the caller decides whether that is a retry of the same event or a conflict.
        Raises QueueUnavailable when Redis is unreachable or the write could not be made durable.
        """
        keys = [c.key for c in claims]
        taken: dict[str, str | None] | None = None
        try:
            client, queue = self._thread_client()
            with client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(*keys)
                        values = [v if v is None or isinstance(v, str) else v.decode() for v in pipe.mget(keys)]
                        if any(v is not None for v in values):
                            pipe.unwatch()
                            taken = dict(zip(keys, values, strict=True))
                            break
                        pipe.multi()
                        for claim in claims:
                            pipe.set(claim.key, claim.value, ex=claim.ttl_s)
                        queue.enqueue_call(
                            JOB_FUNCTION,
                            args=(payload,),
                            job_id=job_id,
                            timeout=self.settings.job_timeout_s,
                            result_ttl=0,
                            failure_ttl=FAILURE_TTL_S,
                            retry=self._retry,
                            pipeline=pipe,
                        )
                        pipe.execute()
                        taken = None
                        break
                    except WatchError:
                        continue
            if taken is not None:
                # A retry: the first attempt may have failed before its fsync. Write (refresh a claim's TTL)
                # and wait for the fsync, which covers everything written before it.
                present = next(c for c in claims if taken[c.key] is not None)
                client.expire(present.key, present.ttl_s)
            self._sync(client)
            return taken
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"Redis: {exc}") from exc

    def _sync(self, client: redis.Redis) -> None:
        if not self.wait_aof:
            return
        try:
            local, _ = client.execute_command("WAITAOF", 1, 0, self.waitaof_timeout_ms)
        except ResponseError as exc:
            raise QueueUnavailable(
                f"Redis cannot confirm the event is on disk ({exc}). Turn on `appendonly yes` (Redis >= 7.2 or "
                "Valkey), or set PAIRLOOP_FEEDBACK_DURABILITY=none to accept events held only in memory."
            ) from exc
        if int(local) < 1:
            raise QueueUnavailable(f"Redis did not fsync its AOF within {self.waitaof_timeout_ms} ms")


@dataclass(frozen=True)
class QueueStatus:
    name: str
    queued: int
    started: int
    scheduled: int
    failed: int
    workers: int

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def status(connection: redis.Redis, settings: WorkerSettings) -> QueueStatus:
    """Counts of the feedback queue, as `rq info` shows them."""
    queue = make_queue(connection, settings)
    return QueueStatus(
        name=queue.name,
        queued=queue.count,
        started=StartedJobRegistry(queue=queue).count,
        scheduled=ScheduledJobRegistry(queue=queue).count,
        failed=FailedJobRegistry(queue=queue).count,
        workers=Worker.count(queue=queue),
    )


def retry_failed(connection: redis.Redis, settings: WorkerSettings) -> int:
    """Requeue every failed job (the handler is idempotent, so this is always safe); how many."""
    queue = make_queue(connection, settings)
    registry = FailedJobRegistry(queue=queue)
    count = 0
    for job_id in registry.get_job_ids():
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        job.retries_left = len(settings.job_retry_intervals_s)
        job.save()
        registry.requeue(job_id)
        count += 1
    return count
