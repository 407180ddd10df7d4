"""The feedback service: checks an event against what was served, then queues it durably.

Order of the checks, each with its own answer (`FeedbackService.accept`): the event's own limits (edits
allowed, their size and the comment's: 422); room in Redis (503 above PAIRLOOP_REDIS_FEEDBACK_LIMIT); the
completion must exist (404) and be within its feedback window (410); the token must be genuine and made for this
completion and this key (403), and a `user` must be the one it was served to (403); the choice must exist (422);
the key's and the judge's buckets must have room (429). Then one Redis transaction claims the `feedback_id` and
the judge's slot on this completion, keeps the record and enqueues the event (`feedback.queue`); a taken claim
is either a retry of the same event (the first answer again) or a conflict (409), and a record that expired in
the meantime is a 410. Nothing is written for a refusal.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine

from feedback.errors import CompletionExpired, CompletionNotFound, FeedbackConflict, InvalidFeedback, TokenRejected
from feedback.queue import Claim, FeedbackQueue, QueueUnavailable, RecordGone
from feedback.schema import (
    EditFeedback,
    FeedbackAccepted,
    FeedbackEvent,
    PairwiseFeedback,
    RatingFeedback,
    claim_slot,
    claim_value,
    fingerprint,
)
from feedback.settings import FeedbackSettings
from serving import records, tokens
from serving.auth import Principal
from serving.errors import Unavailable
from serving.protocol import CompletionRecord
from serving.ratelimit import RateLimiter
from serving.redis_memory import RedisMemory

AnyFeedback = PairwiseFeedback | RatingFeedback | EditFeedback

ID_KEY = "pairloop:feedback:id:"
CLAIM_KEY = "pairloop:feedback:claim:"


class FeedbackService:
    def __init__(
        self,
        settings: FeedbackSettings,
        redis: Redis,
        queue: FeedbackQueue,
        limiter: RateLimiter,
        secret: bytes | tuple[bytes, ...],
        registry: CollectorRegistry,
        *,
        retry_after_s: int = 5,
        memory: RedisMemory | None = None,
    ) -> None:
        self.settings = settings
        self.memory = memory
        self.redis = redis
        self.queue = queue
        self.limiter = limiter
        self.secret = secret
        self.retry_after_s = retry_after_s
        self.events = Counter(
            "pairloop_feedback_events",
            "Feedback requests by kind and outcome (accepted, replayed, conflict).",
            ["kind", "outcome"],
            registry=registry,
        )

    async def accept(self, request: AnyFeedback, caller: Principal) -> dict[str, Any]:
        """The 202 answer for `request`; raises a ServingError for every refusal."""
        self._check_limits(request)
        if self.memory is not None:
            self.memory.admit("feedback")
        now = time.time()
        record = await self._record(request, caller, now)
        judge_user = self._judge(request, record)
        self._check_choice(request, record)
        await self.limiter.take("feedback", caller.key_id, judge_user or None)

        feedback_id = str(request.feedback_id or uuid.uuid4())
        answer = FeedbackAccepted(
            id=feedback_id, completion_id=record.id, kind=request.kind, created_at=int(now)
        ).model_dump()
        ttl_s = max(1, int(record.expires_at - now))
        id_key = ID_KEY + feedback_id
        claim_key = f"{CLAIM_KEY}{record.id}:{caller.key_id}:{judge_user}:{claim_slot(request)}"
        claims = [
            Claim(id_key, json.dumps({"fp": fingerprint(request), "answer": answer}), ttl_s),
            Claim(claim_key, json.dumps({"value": claim_value(request), "answer": answer}), ttl_s),
        ]
        event = FeedbackEvent.from_request(
            request,
            feedback_id=feedback_id,
            completion=record,
            judge_key_id=caller.key_id,
            judge_user=judge_user,
            received_at=now,
        )
        try:
            taken = await self.queue.submit(
                feedback_id, event.queued().model_dump(mode="json"), claims, records.record_key(record.id)
            )
        except QueueUnavailable as exc:
            raise Unavailable(
                f"Feedback could not be queued durably ({exc}); retry with the same feedback_id.",
                retry_after_s=self.retry_after_s,
            ) from exc
        except RecordGone:
            raise CompletionExpired(
                f"Completion {record.id} is past its feedback window; feedback on it is closed.",
                param="completion_id",
            ) from None
        if taken is None:
            self.events.labels(request.kind, "accepted").inc()
            return answer
        return self._answer_taken(request, taken, id_key, claim_key)

    def _answer_taken(
        self, request: AnyFeedback, taken: dict[str, str | None], id_key: str, claim_key: str
    ) -> dict[str, Any]:
        by_id = taken.get(id_key)
        if by_id is not None:
            first = json.loads(by_id)
            if first["fp"] != fingerprint(request):
                self.events.labels(request.kind, "conflict").inc()
                raise FeedbackConflict(
                    "This feedback_id was already used for a different event; use a new UUID for a new event.",
                    param="feedback_id",
                )
            self.events.labels(request.kind, "replayed").inc()
            answer: dict[str, Any] = first["answer"]
            return answer
        claim = json.loads(taken[claim_key] or "{}")
        if claim.get("value") == claim_value(request):
            # The same judgement again under a new id (a client retry without feedback_id): the first stands.
            self.events.labels(request.kind, "replayed").inc()
            same: dict[str, Any] = claim["answer"]
            return same
        self.events.labels(request.kind, "conflict").inc()
        what = "pairwise vote" if isinstance(request, PairwiseFeedback) else f"{request.kind} of this choice"
        raise FeedbackConflict(
            f"This user already gave a different {what} on this completion (feedback {claim['answer']['id']}); "
            "the first one stands."
        )

    def _check_limits(self, request: AnyFeedback) -> None:
        if isinstance(request, EditFeedback):
            if not self.settings.feedback_allow_edits:
                raise InvalidFeedback(
                    "Edit feedback is turned off on this server (PAIRLOOP_FEEDBACK_ALLOW_EDITS).", param="kind"
                )
            if len(request.text) > self.settings.feedback_max_edit_chars:
                raise InvalidFeedback(
                    f"The edit is longer than {self.settings.feedback_max_edit_chars} characters.", param="text"
                )
        if request.comment and len(request.comment) > self.settings.feedback_max_comment_chars:
            raise InvalidFeedback(
                f"The comment is longer than {self.settings.feedback_max_comment_chars} characters.", param="comment"
            )

    async def _record(self, request: AnyFeedback, caller: Principal, now: float) -> CompletionRecord:
        try:
            record = await records.load(self.redis, request.completion_id)
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "Completions cannot be looked up (Redis unavailable); try again shortly.",
                retry_after_s=self.retry_after_s,
            ) from exc
        if record is None:
            # Expired records are gone from Redis; a genuine token for this id tells "expired" from "unknown".
            try:
                claims = tokens.verify(
                    self.secret,
                    request.feedback_token,
                    completion_id=request.completion_id,
                    key_id=caller.key_id,
                    now=0,
                )
            except tokens.TokenError:
                claims = None
            if claims is not None and claims.expires_at < now:
                raise CompletionExpired(
                    f"Completion {request.completion_id} is past its feedback window; feedback on it is closed.",
                    param="completion_id",
                )
            raise CompletionNotFound(f"No completion {request.completion_id} was served.", param="completion_id")
        try:
            tokens.verify(self.secret, request.feedback_token, completion_id=record.id, key_id=caller.key_id, now=now)
        except tokens.TokenError as exc:
            raise TokenRejected(f"Feedback token refused: {exc}.", param="feedback_token") from None
        return record

    @staticmethod
    def _judge(request: AnyFeedback, record: CompletionRecord) -> str:
        """The judging user: the completion's. One served without `user` is judged by the API key alone (""):
        a name given only in the feedback would make every invented name a new judge, each with its own vote."""
        if request.user and not record.user:
            raise TokenRejected(
                "This completion was served without a `user`, so its judge is the API key: send feedback on it "
                "without `user` (or name the user in the chat request).",
                param="user",
            )
        if request.user and request.user != record.user:
            raise TokenRejected("This completion was served to another user.", param="user")
        return record.user or ""

    @staticmethod
    def _check_choice(request: AnyFeedback, record: CompletionRecord) -> None:
        n = len(record.choices)
        if isinstance(request, PairwiseFeedback):
            if n < 2:
                raise InvalidFeedback(
                    "This completion has one choice: a pairwise vote needs two (rate it instead).", param="kind"
                )
        elif request.choice >= n:
            raise InvalidFeedback(f"Choice {request.choice} is out of range: the completion has {n}.", param="choice")


@dataclass(frozen=True)
class Feedback:
    """The feedback API's services in a running gateway (`feedback.app.extension` adds them to the app)."""

    settings: FeedbackSettings
    service: FeedbackService
    store: Engine
    """The preference store, for the routes that read it (GET /v1/feedback/stats, the loop's admin routes)."""
