"""HTTP routes of the feedback API: `POST /v1/feedback` (scope feedback), `GET /v1/feedback/stats` (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from feedback import stats
from feedback.schema import FeedbackRequest
from feedback.service import AnyFeedback, Feedback, FeedbackService
from serving.api import require
from serving.auth import Principal
from serving.errors import Unavailable, responses
from serving.services import service

router = APIRouter()

_REQUEST: TypeAdapter[AnyFeedback] = TypeAdapter(FeedbackRequest)
_KINDS = {"pairwise", "rating", "edit"}


def parse(raw: bytes) -> AnyFeedback:
    """Validate a request body. Done here rather than by FastAPI so that errors name fields as the client
    wrote them (`choice`, not `rating.choice`: pydantic puts the union's tag first)."""
    try:
        return _REQUEST.validate_json(raw)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            loc = tuple(error.get("loc", ()))
            if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
                loc = ("kind",)
                error["msg"] = "must be one of 'pairwise', 'rating', 'edit'"
            elif len(loc) > 1 and loc[0] in _KINDS:
                loc = loc[1:]
            errors.append({**error, "loc": ("body", *loc)})
        raise RequestValidationError(errors) from None


FeedbackDep = Annotated[Feedback, service(Feedback)]


async def _service(feedback: FeedbackDep) -> FeedbackService:
    return feedback.service


async def _store(feedback: FeedbackDep) -> Engine:
    return feedback.store


FeedbackCaller = Annotated[Principal, require("feedback")]
AdminCaller = Annotated[Principal, require("admin")]
FeedbackServiceDep = Annotated[FeedbackService, Depends(_service)]
StoreDep = Annotated[Engine, Depends(_store)]


@router.post(
    "/v1/feedback",
    status_code=202,
    responses=responses(400, 401, 403, 404, 409, 410, 413, 422, 429, 500, 503),
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST.json_schema()}}}
    },
)
async def post_feedback(request: Request, caller: FeedbackCaller, service: FeedbackServiceDep) -> JSONResponse:
    """Queue one feedback event on a served completion; 202 once it is durable."""
    body = parse(await request.body())
    return JSONResponse(await service.accept(body, caller), status_code=202)


@router.get("/v1/feedback/stats", responses=responses(401, 403, 500, 503))
async def feedback_stats(_: AdminCaller, store: StoreDep, service: FeedbackServiceDep) -> dict[str, Any]:
    """Counts by kind and adapter, position bias, and the users with the largest shares."""

    def compute() -> dict[str, Any]:
        with Session(store) as session:
            return stats.compute(session)

    try:
        return await run_in_threadpool(compute)
    except SQLAlchemyError as exc:
        raise Unavailable(
            f"The preference store cannot be read ({type(exc).__name__}); is it migrated (`pairloop db upgrade`)?",
            retry_after_s=service.retry_after_s,
        ) from exc
