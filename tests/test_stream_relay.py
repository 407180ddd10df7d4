"""The gateway relays both answers of a stream as they arrive, never holding one back.

A unit test of the relay against an upstream that streams slowly: vLLM itself may merge the deltas of a lagging
consumer into one (its output collector does), so a stream from the real engine cannot show this
deterministically. The integration tests stream from vLLM (test_gateway, test_swap, test_web).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from deploy.app.gateway import build_app
from tests.feedback_helpers import PROMPT, auth
from tests.gateway_helpers import MODEL_NAME, ServerThread, feedback_settings, settings_for

WORDS = 6
GAP_S = 0.05


def slow_upstream() -> FastAPI:
    """A vLLM stand-in: one model, and chat streams whose choices each send a word every GAP_S, interleaved."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "parent": None}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body.get("n", 1))

        async def events() -> AsyncIterator[bytes]:
            def event(choice: dict[str, Any]) -> bytes:
                chunk = {"id": "up", "object": "chat.completion.chunk", "created": 0, "model": MODEL_NAME}
                return b"data: " + json.dumps(chunk | {"choices": [choice]}).encode() + b"\n\n"

            for w in range(WORDS):
                for i in range(n):
                    yield event({"index": i, "delta": {"content": f"w{i}{w} "}, "finish_reason": None})
                    await asyncio.sleep(GAP_S)
            for i in range(n):
                yield event({"index": i, "delta": {}, "finish_reason": "stop"})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_both_answers_stream_interleaved_as_upstream_sends_them(
    redis_url: str, tmp_path: Path, base_routing: None
) -> None:
    with ServerThread(slow_upstream()) as upstream:
        settings = settings_for(redis_url, [upstream.url], tmp_path)
        with ServerThread(build_app(settings, feedback_settings(tmp_path))) as gw:
            order: list[tuple[int, str]] = []  # (choice, "text" or "end"), as the client received them
            body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 20, "stream": True}
            with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        if choice["delta"].get("content"):
                            order.append((choice["index"], "text"))
                        if choice.get("finish_reason"):
                            order.append((choice["index"], "end"))
    texts = {i: sum(1 for c, kind in order if c == i and kind == "text") for i in (0, 1)}
    assert texts == {0: WORDS, 1: WORDS}, order  # every delta relayed as its own chunk, none merged
    # neither answer waits for the other: choice 1 starts before choice 0 ends, and the reverse
    assert order.index((1, "text")) < order.index((0, "end")), order
    assert order.index((0, "text")) < order.index((1, "end")), order
    assert order[:2] == [(0, "text"), (1, "text")], order
