"""The feedback request (what a client sends), the event (what is queued and stored), and the answer.

A request names a served completion and brings its feedback token back. The event that is queued names the
completion by id; the worker stores it with the completion as the gateway recorded it in Redis, never text from
the client (an opt-in `edit` is the one exception, and it is marked user-written).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from serving.protocol import CompletionRecord, Printable

_ID = r"^[A-Za-z0-9_.:-]+$"


def _exact_preference(value: object) -> object:
    """`0`, `1`, `"tie"` or `"both_bad"` as written: pydantic's lax mode would take `true` as 1, `0.0` as 0."""
    if type(value) is int or value in ("tie", "both_bad"):
        return value
    raise ValueError('must be exactly 0, 1, "tie" or "both_bad" (no booleans, floats or numeric strings)')


Text = Printable
Choice = Annotated[int, Strict(), Field(ge=0, le=1)]
"""A choice index, exactly 0 or 1: `true`, `1.0` and `"1"` are refused."""


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128, pattern=_ID, description="The `id` of the completion.")
    feedback_token: str = Field(min_length=1, max_length=1024, description="`pairloop.feedback_token` of it.")
    feedback_id: uuid.UUID | None = Field(None, description="Client-made UUID; a retry with it is answered the same.")
    user: Text | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Who judged: the completion's `user` (naming it again is allowed, another one is refused); "
        "a completion served without `user` is judged by the API key, and naming a user is refused.",
    )
    comment: Text | None = Field(None, max_length=20_000, description="Free text, kept with the event.")


class PairwiseFeedback(_Base):
    kind: Literal["pairwise"]
    preference: Annotated[Literal[0, 1, "tie", "both_bad"], BeforeValidator(_exact_preference)] = Field(
        description="The better choice's index, `tie`, or `both_bad`."
    )


class RatingFeedback(_Base):
    kind: Literal["rating"]
    choice: Choice = Field(description="Index of the rated choice.")
    rating: Literal["up", "down"]


class EditFeedback(_Base):
    kind: Literal["edit"]
    choice: Choice = Field(description="Index of the choice the edit corrects.")
    text: Text = Field(min_length=1, max_length=100_000, description="The corrected answer, written by the user.")


FeedbackRequest = Annotated[PairwiseFeedback | RatingFeedback | EditFeedback, Field(discriminator="kind")]


def fingerprint(request: PairwiseFeedback | RatingFeedback | EditFeedback) -> str:
    """A digest of what the request asks, without its `feedback_id`: a retry must ask the same."""
    data = request.model_dump(mode="json", exclude={"feedback_id"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def claim_slot(request: PairwiseFeedback | RatingFeedback | EditFeedback) -> str:
    """What one judge may say only once about one completion: the pairwise vote, a rating or an edit per choice."""
    if isinstance(request, PairwiseFeedback):
        return "pairwise"
    return f"{request.kind}:{request.choice}"


def claim_value(request: PairwiseFeedback | RatingFeedback | EditFeedback) -> str:
    """The judgement itself, to tell a repeated vote (same answer) from a changed one (409)."""
    if isinstance(request, PairwiseFeedback):
        return str(request.preference)
    if isinstance(request, RatingFeedback):
        return request.rating
    return hashlib.sha256(request.text.encode()).hexdigest()[:32]


class _Event(BaseModel):
    feedback_id: str
    kind: Literal["pairwise", "rating", "edit"]
    judge_key_id: str
    judge_user: str
    """The judging user, or "" when neither the request nor the completion named one."""
    preference: Literal["0", "1", "tie", "both_bad"] | None = None
    choice: int | None = None
    rating: Literal["up", "down"] | None = None
    edit_text: str | None = None
    comment: str | None = None
    received_at: float


class QueuedEvent(_Event):
    """What a feedback job carries: the event, naming its completion by id. The worker reads the completion's
    record from Redis (the queue holds no second copy of it)."""

    completion_id: str

    def with_completion(self, completion: CompletionRecord) -> FeedbackEvent:
        return FeedbackEvent(**self.model_dump(exclude={"completion_id"}), completion=completion)


class FeedbackEvent(_Event):
    """One accepted event with its completion as the gateway recorded it: self-contained and traceable, what is
    stored."""

    completion: CompletionRecord

    def queued(self) -> QueuedEvent:
        return QueuedEvent(**self.model_dump(exclude={"completion"}), completion_id=self.completion.id)

    @classmethod
    def from_request(
        cls,
        request: PairwiseFeedback | RatingFeedback | EditFeedback,
        *,
        feedback_id: str,
        completion: CompletionRecord,
        judge_key_id: str,
        judge_user: str,
        received_at: float,
    ) -> FeedbackEvent:
        fields: dict[str, Any] = {}
        if isinstance(request, PairwiseFeedback):
            fields["preference"] = str(request.preference)
        elif isinstance(request, RatingFeedback):
            fields.update(choice=request.choice, rating=request.rating)
        else:
            fields.update(choice=request.choice, edit_text=request.text)
        return cls(
            feedback_id=feedback_id,
            kind=request.kind,
            completion=completion,
            judge_key_id=judge_key_id,
            judge_user=judge_user,
            comment=request.comment,
            received_at=received_at,
            **fields,
        )


class FeedbackAccepted(BaseModel):
    """The 202 answer. A retry with the same `feedback_id` gets the same one."""

    id: str
    object: Literal["feedback"] = "feedback"
    status: Literal["accepted"] = "accepted"
    completion_id: str
    kind: str
    created_at: int
