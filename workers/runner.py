"""`pairloop worker`: RQ workers that drain the feedback queue into the preference store.

The workers run jobs in their own process (RQ's `SimpleWorker`: no fork per job, which would cost more
than the job). A worker killed in the middle of a job leaves it in RQ's started registry; once the job's
timeout plus `job_abandoned_after_s` has passed, a live worker's maintenance pass retries it. The handler
is idempotent, so a job whose commit landed before the kill is rerun harmlessly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import WorkerStatus
from rq.worker_registration import clean_worker_registry

from feedback import jobs
from feedback.queue import JOB_FUNCTION, make_queue
from serving.redis_client import connect_sync
from trainer.queue import CHECK_FUNCTION, ROUND_FUNCTION
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


ALLOWED_JOBS = frozenset(
    {
        JOB_FUNCTION,
        ROUND_FUNCTION,
        CHECK_FUNCTION,
        # release 0.1's names of the same functions (workers/jobs.py, workers/training.py)
        "workers.jobs.store_feedback",
        "workers.training.check",
        "workers.training.train_round",
    }
)
"""The only functions a pairloop worker runs. A job is a function's import path and its arguments in Redis, and
RQ imports whatever path a job names; anyone who can write to Redis could otherwise make a worker call any
function it can import (`os.system`, with arguments of their choosing)."""


class ForbiddenJob(Exception):
    """A job names a function outside `ALLOWED_JOBS`: it fails without running."""


class AllowedJob(Job):
    """RQ's Job, whose function must be in `ALLOWED_JOBS`, and whose callbacks (pairloop sets none) are ignored:
    a callback is a function RQ imports by name as well."""

    @property
    def func(self) -> Callable[..., object] | None:
        if self.func_name not in ALLOWED_JOBS:
            raise ForbiddenJob(f"job {self.id} names {self.func_name!r}, which is not a pairloop job: not run")
        return super().func

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


class FeedbackWorker(SimpleWorker):
    """A SimpleWorker that keeps a running job's heartbeat fresh, so that the job of a worker that died is taken
    back `abandoned_after_s` after its last heartbeat, however long the job may run.

    RQ's SimpleWorker runs the job in its own thread and renews nothing meanwhile, so the job's entry in the
    started registry had to live as long as the job's timeout: a training round (timeout an hour) whose worker was
    SIGKILLed stayed there for an hour. Here a thread renews it every `HEARTBEAT_S`; RQ's default would wait the
    job timeout plus 60 s, or 420 s without one.
    """

    HEARTBEAT_S = 5.0
    abandoned_after_s = 10
    stop_signalled = False  # SIGINT/SIGTERM: `work` ended because it was asked to

    def request_stop(self, signum: int, frame: object) -> None:
        self.stop_signalled = True
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return int(min(job.timeout or 30, 3 * self.HEARTBEAT_S)) + self.abandoned_after_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.forget_dead_executions(job)
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        while not stop.wait(self.HEARTBEAT_S):
            try:
                self.maintain_heartbeats(job, execution)
            except (redis.RedisError, OSError) as exc:  # Redis away for a moment: the next beat tries again
                log.warning("heartbeat of job %s failed: %s", job.id, exc)

    def forget_dead_executions(self, job: Job) -> int:
        """Drop executions of `job` whose worker died from the job's own execution registry; how many.

        RQ lists an execution there until a minute after its heartbeat expiry, but its hash expires with
        the heartbeat. When the job then succeeds on a rerun, RQ's cleanup fetches every execution listed
        and fails on the missing one ("Execution ... not found in Redis"), so the rerun counts as a failure
        and is retried until the entry ages out. Seen in the worker-killed durability test.
        """
        registry = ExecutionRegistry(job.id, self.connection)
        listed: list[bytes] = self.connection.zrange(registry.key, 0, -1)  # type: ignore[assignment]
        dead = [e for e in listed if not self.connection.exists(Execution(e.decode(), job.id, self.connection).key)]
        if dead:
            self.connection.zrem(registry.key, *dead)
        return len(dead)

    def clean_registries(self) -> None:
        """Take back abandoned jobs, then RQ's `clean_registries`, under a lock that expires with the interval.

        RQ's lock lives 899 s: a worker killed while cleaning would stop every other worker from taking
        back abandoned jobs for 15 minutes.
        """
        for queue in self.queues:
            if queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=max(1, int(self.maintenance_interval))):
                self.requeue_abandoned(queue)
                self.enqueue_overdue_retries(queue)
                clean_registries(queue, self._exc_handlers)
                clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]

    def requeue_abandoned(self, queue: Queue) -> int:
        """Put jobs whose worker died back at the front of the queue, at once; how many.

        Two places hold them. An execution in RQ's started registry whose time ran out; and a job in RQ's
        intermediate queue (where a worker moves it when it takes it) that no execution has claimed since
        the previous maintenance pass: a live worker claims it within milliseconds. RQ's own cleanup
        retries only jobs already marked started, through a retry schedule that needs a scheduler whose
        lock a dead worker may hold, and leaves the intermediate queue for a minute. Running a job twice is
        harmless here (the store ignores a second insert), so these are simply run again.
        """
        registry = StartedJobRegistry(queue=queue)
        expired: list[bytes] = queue.connection.zrangebyscore(registry.key, 0, time.time())  # type: ignore[assignment]
        claimed = set(registry.get_job_ids(cleanup=False))
        intermediate = queue.intermediate_queue
        stuck = []
        for job_id in intermediate.get_job_ids():
            if job_id in claimed or intermediate.set_first_seen(job_id):
                continue
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen and now() - first_seen > timedelta(seconds=self.maintenance_interval):
                stuck.append(job_id)
        count = 0
        for job_id, entry in [(registry.parse_job_id(e.decode()), e) for e in expired] + [(j, None) for j in stuck]:
            job = queue.fetch_job(job_id)
            with queue.connection.pipeline() as pipe:
                pipe.multi()  # before any command: RQ's enqueue_job below adds to this transaction
                if entry is not None:
                    pipe.zrem(registry.key, entry)
                pipe.lrem(intermediate.key, 0, job_id)
                if job is not None and job.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED):
                    queue.enqueue_job(job, pipeline=pipe, at_front=True)
                    count += 1
                pipe.execute()
        if count:
            self.log.warning("requeued %d job(s) whose worker died", count)
        return count

    def enqueue_overdue_retries(self, queue: Queue) -> int:
        """Enqueue retries that are due for longer than a maintenance interval; how many.

        RQ's scheduler enqueues due retries every second, but only in the process that holds the queue's
        scheduler lock. A worker SIGKILLed with its scheduler leaves that lock behind for up to 61 s
        (`interval + 60`, rq/scheduler.py), and its retries would wait as long. A retry overdue by a whole
        maintenance interval means no scheduler is running, so the worker enqueues it itself, as
        `RQScheduler.enqueue_scheduled_jobs` does. Should a scheduler come back at that moment, the job
        may run twice, which the idempotent handler allows.
        """
        registry = queue.scheduled_job_registry
        # RQ scores a retry by its due time in whole seconds (rounded down): one scored s was due by s + 1 at the
        # latest, so it is overdue by an interval for sure once s + 1 <= now - interval
        cutoff = math.floor(time.time() - max(1.0, self.maintenance_interval)) - 1
        job_ids = registry.get_jobs_to_schedule(cutoff)
        count = 0
        for job_id in job_ids:
            job = queue.fetch_job(job_id)
            with queue.connection.pipeline() as pipe:
                pipe.multi()
                registry.remove(job_id, pipeline=pipe)
                if job is not None:
                    queue.enqueue_job(job, pipeline=pipe, at_front=True)
                    count += 1
                pipe.execute()
        if count:
            self.log.warning("enqueued %d overdue retr%s (no scheduler ran them)", count, "y" if count == 1 else "ies")
        return count


def lower_priority(priority: str | int) -> None:
    """Serving first: on a machine it shares with vLLM's CPU engine and the gateway, the training worker takes the
    CPU they leave (the threads torch starts later inherit this). `idle`: SCHED_IDLE where the OS has it, else
    nice 19; a number: that nice value. docs/PERFORMANCE.md, "Training beside serving", has the measurements."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority := 19 if priority == "idle" else int(priority):
        os.nice(priority)


def _children_die_with_worker() -> None:
    # RQ forks a scheduler process (due retries); PR_SET_PDEATHSIG makes it exit when the worker dies,
    # even by SIGKILL, instead of living on as an orphan.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def make_worker(
    connection: redis.Redis, settings: WorkerSettings, name: str | None = None, queues: list[Queue] | None = None
) -> FeedbackWorker:
    """A worker on the feedback queue (default), or on `queues`."""
    worker = FeedbackWorker(
        queues or [make_queue(connection, settings)],
        connection=connection,
        name=name,
        serializer=JSONSerializer,
        job_class=AllowedJob,
        # The blocking dequeue returns every maintenance interval, so abandoned jobs and due retries are
        # looked at on time even when the queue is idle.
        worker_ttl=settings.maintenance_interval_s + 15,
        maintenance_interval=settings.maintenance_interval_s,
    )
    worker.abandoned_after_s = settings.job_abandoned_after_s  # this worker's, not the class's
    return worker


def run(
    redis_url: str, settings: WorkerSettings, *, burst: bool = False, name: str | None = None, training: bool = False
) -> None:
    """Work until SIGTERM/SIGINT (or, with `burst`, until the queue is empty). The store must be migrated
    (`pairloop worker` does it first: deploy/migrations). Redis going away does not end it: the worker waits
    for it and starts again (`keep_running`).

    A feedback worker takes the feedback queue only: on one queue RQ moves a job atomically into its
    intermediate queue as it takes it (BLMOVE), so a worker killed at that moment loses nothing; on several
    queues it pops with BLPOP, and a job taken by a worker that dies before it registers the job is gone.
    A training worker (`training`) takes the control queue (the periodic checks) and training rounds, so a
    round, which can take minutes, never holds up feedback; what it could lose that way comes back by
    itself (the cron queues a check every interval, and a check queues a round while its data is new).
    One process is one worker; run more feedback workers for more throughput (PostgreSQL takes their writes
    in parallel, SQLite one at a time).
    """
    from trainer import loop
    from trainer.queue import training_queue
    from trainer.settings import TrainerSettings

    jobs.configure(settings.store_url(), redis_url)
    loop.configure(redis_url)
    os.register_at_fork(after_in_child=_children_die_with_worker)
    connection = connect_sync(redis_url)
    trainer = TrainerSettings()
    if training:
        lower_priority(trainer.train_priority)
    if training:
        control = Queue(trainer.control_queue, connection=connection, serializer=JSONSerializer)
        queues = [control, training_queue(connection, trainer)]
    else:
        queues = [make_queue(connection, settings)]

    if burst:  # one pass: a Redis that goes away meanwhile is the caller's error to see
        worker = make_worker(connection, settings, name, queues)
        worker.work(burst=True, with_scheduler=not training, logging_level="INFO")
        return
    last: list[FeedbackWorker] = []  # the worker of the latest start

    def one_worker() -> None:
        last[:] = [make_worker(connection, settings, name, queues)]
        last[0].work(with_scheduler=not training, logging_level="INFO")

    keep_running(
        one_worker, lambda: last[0].stop_signalled, lambda: release(last[0]), what=f"worker {name or ''}".strip()
    )


RECONNECT_FIRST_S = 1.0
RECONNECT_MAX_S = 30.0
LIVED_LONG_S = 60.0  # a worker that ran this long before it ended starts the backoff over


def keep_running(
    start: Callable[[], object],
    stopped: Callable[[], bool],
    before_restart: Callable[[], object],
    *,
    what: str,
    first_s: float = RECONNECT_FIRST_S,
    max_s: float = RECONNECT_MAX_S,
) -> None:
    """Run `start` until it ends with `stopped()` true (asked to stop, even if Redis was away as it said
    goodbye); when it ends otherwise or raises a Redis error (the server went away: RQ's worker and cron
    scheduler end on one, from wherever they were), wait with exponential backoff, call `before_restart` (which
    may raise a Redis error too: still away) and start again. A SIGINT/SIGTERM while waiting ends it.

    Without this a worker that lost Redis for a moment exited, and the events it had not stored waited in the
    queue until something restarted it: the chaos bench found both feedback workers gone after a Valkey restart
    and after a 10 s network cut (docs/RELIABILITY.md).
    """
    delay = first_s
    pending = False  # a restart waiting for `before_restart` to succeed
    while True:
        if not pending:
            began = time.monotonic()
            try:
                start()
                lost = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                lost = exc
            except StopRequested:
                return
            if stopped():
                return
            if lost is None:
                log.warning("%s ended without being asked to", what)
            else:
                log.warning("%s lost Redis: %s", what, lost)
            if time.monotonic() - began > LIVED_LONG_S:
                delay = first_s
        log.warning("%s: starting again in %.0f s", what, delay)
        if _wait_unless_signalled(delay):
            return
        delay = min(delay * 2, max_s)
        try:
            before_restart()
            pending = False
        except (redis.RedisError, OSError) as exc:
            log.warning("%s: Redis still away: %s", what, exc)
            pending = True


def _wait_unless_signalled(seconds: float) -> bool:
    """Sleep `seconds`; True if SIGINT or SIGTERM came meanwhile (the handlers are put back after)."""
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return stop.wait(seconds)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def release(worker: FeedbackWorker) -> None:
    """What a worker that lost Redis left behind: its pubsub thread, and its registration (so that a worker of the
    same name can register). Raises a Redis error while Redis is still away."""
    if worker.pubsub_thread is not None:
        worker.pubsub_thread.stop()
        worker.pubsub_thread.join(timeout=1)
        with contextlib.suppress(redis.RedisError, OSError):
            worker.pubsub.close()
        worker.pubsub_thread = None
    worker.register_death()
