"""Served completions and feedback events made in memory, for the store and queue tests."""

from __future__ import annotations

import time
import uuid
from typing import Any

from feedback.schema import FeedbackEvent
from serving.protocol import CompletionRecord, SamplingParams, ServedChoice


def record(
    a: str = "Answer A.", b: str | None = "Answer B.", cid: str | None = None, adapters: tuple[str, str] | None = None
) -> CompletionRecord:
    """A served completion; its choices come from `adapters` (default: `adapter-0`, `adapter-1`)."""
    now = time.time()
    names = adapters or ("adapter-0", "adapter-1")
    texts = [a] if b is None else [a, b]
    return CompletionRecord(
        id=cid or f"chatcmpl-{uuid.uuid4().hex}",
        model="pairloop-tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        sampling=SamplingParams(n=len(texts), temperature=1.0),
        choices=[ServedChoice(index=i, text=t, finish_reason="stop", adapter=names[i]) for i, t in enumerate(texts)],
        key_id="full",
        user="alice",
        stream=False,
        created_at=now,
        finished_at=now,
        expires_at=now + 3600,
    )


def event(completion: CompletionRecord, kind: str = "pairwise", judge: str = "alice", **fields: Any) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=str(uuid.uuid4()),
        kind=kind,  # type: ignore[arg-type]
        completion=completion,
        judge_key_id="full",
        judge_user=judge,
        received_at=time.time(),
        **fields,
    )
