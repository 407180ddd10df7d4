"""Errors of the feedback API. They extend the gateway's tree, so the same handlers give them OpenAI's shape.

ServingError (serving/errors.py)
├── CompletionNotFound      404  no completion with this id was ever served (or Redis lost it)
├── TokenRejected           403  the feedback token is forged, expired, or made for another completion or key
├── CompletionExpired       410  the completion is past its TTL: feedback on it is closed
├── InvalidFeedback         422  the event does not fit the completion (choice out of range, edits off, ...)
└── FeedbackConflict        409  a different vote by the same judge, or a `feedback_id` reused for another event
"""

from __future__ import annotations

from serving.errors import ServingError


class CompletionNotFound(ServingError):
    status_code = 404
    type = "invalid_request_error"
    code = "completion_not_found"


class TokenRejected(ServingError):
    status_code = 403
    type = "permission_error"
    code = "invalid_feedback_token"


class CompletionExpired(ServingError):
    status_code = 410
    type = "invalid_request_error"
    code = "completion_expired"


class InvalidFeedback(ServingError):
    status_code = 422
    type = "invalid_request_error"
    code = "invalid_field"


class FeedbackConflict(ServingError):
    status_code = 409
    type = "invalid_request_error"
    code = "feedback_conflict"
