"""The feedback queue, producer side: RQ over Redis, with the JSON serializer and retries (the workers that
drain it: workers/runner.py).

`FeedbackQueue.submit` is what the API calls for each event. One Lua script checks the event's claims (its
`feedback_id`, and the judge's verdict on that completion), and only if all are free sets them and writes
the RQ job; `WAITAOF` follows on the same connection, in the same round trip, so the API answers 202 only
once Redis has fsynced that write to its append-only file. An event is queued durably with its claims, or
not at all.

The job itself is made by RQ: `Queue.enqueue_call` runs against a recorder that stands in for a redis-py
pipeline, and the commands it records (HSET of the job, RPUSH onto the queue, SADD of the queue) run inside
the script. So the jobs are exactly what RQ's workers and `rq info` expect, while the API stays on asyncio
and spends one round trip per event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.commands.core import CoreCommands
from redis.exceptions import NoScriptError, RedisError, ResponseError
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from feedback.settings import FeedbackSettings, QueueSettings

JOB_FUNCTION = "feedback.jobs.store_feedback"

# KEYS: the claim keys, then the completion's record. ARGV: the claim count, the claims' TTL in ms, how long the
# record must still live in ms, the claim values, then the commands that enqueue the job: their count, and for
# each its argument count and arguments.
# Returns nil when the claims were set and the job written; 'gone' when the record has expired; else the claims'
# current values (nil where free).
_SUBMIT = """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local hold = tonumber(ARGV[3])
local values = {}
local taken = false
for i = 1, n do
  values[i] = redis.call('GET', KEYS[i])
  if values[i] then taken = true end
end
if taken then
  -- A retry. Write something (refresh the claims' TTL), so that the WAITAOF that follows covers the first
  -- attempt's writes too: that attempt may have failed between its write and its fsync.
  for i = 1, n do
    if values[i] then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
  return values
end
local record = KEYS[n + 1]
local left = redis.call('PTTL', record)
if left == -2 then return 'gone' end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[3 + i], 'PX', ttl)
end
local pos = 4 + n
for c = 1, tonumber(ARGV[pos]) do
  local argc = tonumber(ARGV[pos + 1])
  redis.call(unpack(ARGV, pos + 2, pos + 1 + argc))
  pos = pos + 1 + argc
end
-- The job names the record: it must outlive the job's wait in the queue.
if left >= 0 and left < hold then redis.call('PEXPIRE', record, hold) end
return nil
"""


class QueueUnavailable(Exception):
    """Redis cannot be reached, or it could not make the event durable: nothing was acknowledged."""


class RecordGone(Exception):
    """The completion's record expired between the checks and the enqueue: nothing was queued."""


@dataclass(frozen=True)
class Claim:
    """A key that must not exist yet; it is set to `value` for `ttl_s` together with the enqueue."""

    key: str
    value: str
    ttl_s: int


def make_queue(connection: redis.Redis, settings: QueueSettings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


class _Recorder(CoreCommands):
    """Takes the place of a redis-py pipeline in RQ's enqueue and keeps the commands instead of sending them."""

    explicit_transaction = True
    _event_dispatcher: Any = None

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def multi(self) -> None:
        pass

    def execute_command(self, *args: Any, **options: Any) -> _Recorder:
        self.commands.append(args)
        return self


class FeedbackQueue:
    def __init__(
        self,
        client: AsyncRedis,
        settings: FeedbackSettings,
        *,
        wait_aof: bool = True,
        waitaof_timeout_ms: int = 2000,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.wait_aof = wait_aof
        self.waitaof_timeout_ms = waitaof_timeout_ms
        retries = settings.job_retry_intervals_s
        self._retry = Retry(max=len(retries), interval=retries) if retries else None
        # RQ needs a connection object to build jobs; nothing is sent on it (see `_job_commands`).
        self._rq = make_queue(redis.Redis(), settings)
        self._rq.redis_server_version = (7, 0, 0)
        self._sha = hashlib.sha1(_SUBMIT.encode()).hexdigest()

    def _job_commands(self, job_id: str, payload: dict[str, Any]) -> list[tuple[Any, ...]]:
        recorder = _Recorder()
        self._rq.enqueue_call(
            JOB_FUNCTION,
            args=(payload,),
            job_id=job_id,
            description=f"store feedback {job_id}",
            timeout=self.settings.job_timeout_s,
            result_ttl=0,
            failure_ttl=self.settings.job_failure_ttl_s,
            retry=self._retry,
            pipeline=recorder,  # type: ignore[arg-type]
        )
        return recorder.commands

    async def submit(
        self, job_id: str, payload: dict[str, Any], claims: list[Claim], record_key: str
    ) -> dict[str, str | None] | None:
        """Enqueue `payload` as job `job_id` with its claims, durably, keeping the completion's record at
        `record_key` at least `feedback_record_hold_s` longer; or, when a claim is taken, nothing.

        Returns None when the job was enqueued, else the current value of every claim key (None where
        free): the caller decides whether that is a retry of the same event or a conflict.
        Raises QueueUnavailable when Redis is unreachable or the write could not be made durable, and
        RecordGone when the record expired meanwhile.
        """
        ttl_ms = 1000 * min((c.ttl_s for c in claims), default=1)
        hold_ms = 1000 * self.settings.feedback_record_hold_s
        args: list[Any] = [len(claims), ttl_ms, hold_ms, *(c.value for c in claims)]
        commands = self._job_commands(job_id, payload)
        args.append(len(commands))
        for command in commands:
            args += [len(command), *(a.value if isinstance(a, Enum) else a for a in command)]
        keys = [*(c.key for c in claims), record_key]
        try:
            results = await self._run(keys, args)
            if isinstance(results[0], NoScriptError):  # a restarted Redis forgot the script
                await self.redis.script_load(_SUBMIT)
                results = await self._run(keys, args)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"Redis: {exc}") from exc
        taken = results[0]
        if isinstance(taken, Exception):
            raise QueueUnavailable(f"Redis: {taken}")
        if self.wait_aof:
            self._check_fsync(results[1])
        if taken is None:
            return None
        if taken == b"gone":
            raise RecordGone(record_key)
        return {c.key: None if v is None else v.decode() for c, v in zip(claims, taken, strict=True)}

    async def _run(self, keys: list[str], args: list[Any]) -> list[Any]:
        # EVALSHA and WAITAOF in one round trip on one connection (WAITAOF waits for that connection's writes).
        # Not redis-py's Script object: in a pipeline it asks SCRIPT EXISTS first, a round trip per event.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
            if self.wait_aof:
                pipe.execute_command("WAITAOF", 1, 0, self.waitaof_timeout_ms)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _check_fsync(self, reply: Any) -> None:
        if isinstance(reply, ResponseError):
            raise QueueUnavailable(
                f"Redis cannot confirm the event is on disk ({reply}). Turn on `appendonly yes` (Redis >= 7.2 or "
                "Valkey), or set PAIRLOOP_FEEDBACK_DURABILITY=none to accept events held only in memory."
            )
        if isinstance(reply, Exception):
            raise QueueUnavailable(f"Redis: {reply}")
        if int(reply[0]) < 1:
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


def status(connection: redis.Redis, settings: QueueSettings) -> QueueStatus:
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


def retry_failed(connection: redis.Redis, settings: QueueSettings) -> int:
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
