"""The chat service: one client request becomes one vLLM request per adapter, a pair of choices, a record.

Every choice is assigned the vLLM model name (base or adapter) that will produce it. Choices of the same
name go to vLLM as one request with `n` > 1, so the two samples share the prompt's KV cache through
prefix caching; choices of different names (champion against challenger) run as concurrent
requests and are merged. Only a completion that finished and was recorded in Redis is handed out with
a feedback token; a request that fails records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving import records, tokens
from serving.adapters.router import AdapterRouter
from serving.auth import Principal
from serving.backends import BackendPool
from serving.errors import (
    AdapterError,
    InvalidRequest,
    ModelNotFound,
    ServingError,
    Unavailable,
    UpstreamError,
    error_body,
)
from serving.metrics import Metrics
from serving.protocol import ChatCompletionRequest, CompletionRecord, SamplingParams, ServedChoice
from serving.redis_memory import RedisMemory
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5
"""A top_p this small keeps the most likely token alone (top-p keeps at least one): greedy, as vLLM 0.32 is below
this temperature (`_SAMPLING_EPS`, vllm/sampling_params.py)."""

PAIR_TEMPERATURE_FROM = 1e-2
"""The lowest temperature a pair is sampled at: vLLM 0.32 raises any temperature in (0, 0.01) to 0.01 (`_MAX_TEMP`,
vllm/sampling_params.py), where the two choices of the tiny model already come back identical, and is greedy below
1e-5. tests/test_units.py reads both constants from the installed vLLM."""

EXTENSION = "pairloop"
"""Name of the extension object in responses and in the stream's last chunk (the OpenAI SDK keeps it)."""


@dataclass
class Plan:
    """What will be asked of vLLM for one client request."""

    id: str
    public_model: str
    adapters: list[str]
    """vLLM model name of each choice, by index."""
    sampling: SamplingParams
    body: dict[str, Any]
    """The upstream request body without `model` and `n`."""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.time)

    def groups(self) -> dict[str, list[int]]:
        """Choice indexes by the model that produces them, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.adapters):
            out.setdefault(name, []).append(i)
        return out


@dataclass
class Collected:
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatService:
    def __init__(
        self,
        settings: ServingSettings,
        pool: BackendPool,
        client: aiohttp.ClientSession,
        redis: Redis,
        metrics: Metrics,
        secret: bytes,
        router: AdapterRouter | None = None,
        memory: RedisMemory | None = None,
    ) -> None:
        self.router = router
        self.memory = memory
        self.settings = settings
        self.pool = pool
        self.client = client
        self.redis = redis
        self.metrics = metrics
        self.secret = secret

    # -- planning ---------------------------------------------------------------------------------

    def public_model(self) -> str:
        name = self.settings.served_model_name or self.pool.base_model()
        if name is None:
            raise Unavailable(
                "No inference backend is available; try again shortly.",
                retry_after_s=self.settings.retry_after_s,
            )
        return name

    def choose_adapters(self, n: int) -> list[str]:
        """The vLLM model name for each of `n` choices: the champion adapter (the base model before any
        was promoted), or champion and challenger for a share of pairs."""
        base = self.pool.base_model() or self.public_model()
        if self.router is None:
            return [base] * n
        return self.router.choose(n, base)

    def pinned(self, model: str | None, public: str) -> str | None:
        """The vLLM model name a request pins with `<public>@base` or `<public>@<adapter>` (an adapter served
        now: champion or challenger), None for plain `<public>` (the router chooses), else 404."""
        if model is None or model == public:
            return None
        name, sep, version = model.partition("@")
        if sep and name == public:
            if version == "base":
                return self.pool.base_model() or public
            if self.router is not None and version in self.router.routing.served():
                return version
            served = ", ".join(f"'{public}@{v}'" for v in self.router.routing.served()) if self.router else ""
            raise ModelNotFound(
                f"The model '{model}' is not served: pin '{public}@base'{' or ' + served if served else ''}.",
                param="model",
            )
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves '{public}'.", param="model")

    def plan(self, req: ChatCompletionRequest) -> Plan:
        if self.memory is not None:
            self.memory.admit("chat")  # before vLLM works on an answer whose record Redis could not take
        public = self.public_model()
        pinned = self.pinned(req.model, public)
        n = req.n if req.n is not None else self.settings.responses_per_request
        if n > 2:
            raise InvalidRequest(f"n={n} is not supported: pairloop serves 1 or 2 choices per request.", param="n")
        temperature = 1.0 if req.temperature is None else req.temperature
        if n > 1 and temperature < PAIR_TEMPERATURE_FROM:
            raise InvalidRequest(
                f"temperature {temperature:g} is below {PAIR_TEMPERATURE_FROM:g}, where vLLM stops sampling: both "
                "choices of a pair would be identical; use a higher temperature, or n: 1.",
                param="temperature",
            )
        if n > 1 and req.top_p is not None and req.top_p < GREEDY_BELOW:
            raise InvalidRequest(
                f"top_p {req.top_p:g} keeps only the most likely token: both choices of a pair would be identical; "
                "use a higher top_p, or n: 1.",
                param="top_p",
            )
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise InvalidRequest("Give max_tokens or max_completion_tokens, not both.", param="max_tokens")
        limit = self.settings.max_tokens_limit
        max_tokens = req.max_completion_tokens or req.max_tokens or min(self.settings.max_tokens_default, limit)
        if max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is over this server's limit of {limit}.",
                param="max_tokens",
            )
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        sampling = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=req.top_p,
            max_tokens=max_tokens,
            stop=stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )
        body: dict[str, Any] = {
            "messages": [m.model_dump(exclude_none=True) for m in req.messages],
            **sampling.model_dump(exclude_none=True, exclude={"n"}),
        }
        adapters = [pinned] * n if pinned else self.choose_adapters(n)
        return Plan(f"chatcmpl-{uuid.uuid4().hex}", public, adapters, sampling, body)

    def _hold(self, plan: Plan) -> contextlib.AbstractContextManager[None]:
        """Counts the plan's choices as in flight on their adapters (an adapter is unloaded only at zero)."""
        return self.router.hold(plan.adapters) if self.router else contextlib.nullcontext()

    # -- upstream ---------------------------------------------------------------------------------

    def _upstream_error(self, status: int, payload: bytes) -> ServingError:
        try:
            message = json.loads(payload)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = payload.decode(errors="replace")[:500] or f"HTTP {status}"
        if status >= 500:
            log.error("vLLM answered %s: %s", status, message)
            return Unavailable(f"The inference backend failed: {message}", retry_after_s=self.settings.retry_after_s)
        return UpstreamError(status, message)

    @contextlib.asynccontextmanager
    async def _open(self, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """An upstream response with a 200 status, from the first backend that accepts the connection."""
        tried: set[str] = set()
        while True:
            async with self.pool.lease(exclude=tried, model=body["model"]) as backend:
                model = body["model"]
                if self.router and model not in backend.models and model != backend.base_model:
                    try:
                        await self.router.ensure(backend, model)
                    except AdapterError as exc:
                        raise Unavailable(exc.message, retry_after_s=self.settings.retry_after_s) from exc
                url = f"{backend.url}/v1/chat/completions"
                try:
                    resp = await self.client.post(url, json=body, headers=self.pool.headers)
                except aiohttp.ClientConnectorError as exc:
                    # nothing reached vLLM: safe to try another backend
                    self.pool.mark_down(backend, f"connect error: {exc}")
                    tried.add(backend.url)
                    continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise Unavailable(
                        f"The inference backend failed: {exc!r}", retry_after_s=self.settings.retry_after_s
                    ) from exc
                try:
                    if resp.status != 200:
                        raise self._upstream_error(resp.status, await resp.read())
                    yield resp
                finally:
                    resp.release()
                return

    def _upstream_body(self, plan: Plan, model: str, n: int, stream: bool) -> dict[str, Any]:
        body = {**plan.body, "model": model, "n": n}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    # -- recording --------------------------------------------------------------------------------

    async def _record(
        self, plan: Plan, got: Collected, req: ChatCompletionRequest, principal: Principal, stream: bool
    ) -> tuple[CompletionRecord, str]:
        now = time.time()
        choices = [
            ServedChoice(
                index=i, text="".join(got.texts.get(i, [])), finish_reason=got.finish.get(i), adapter=plan.adapters[i]
            )
            for i in range(len(plan.adapters))
        ]
        record = CompletionRecord(
            id=plan.id,
            model=plan.public_model,
            messages=plan.body["messages"],
            sampling=plan.sampling,
            choices=choices,
            key_id=principal.key_id,
            user=req.user,
            stream=stream,
            prompt_tokens=got.prompt_tokens,
            completion_tokens=got.completion_tokens,
            created_at=plan.started,
            finished_at=now,
            expires_at=now + self.settings.record_ttl_s,
        )
        try:
            await records.save(self.redis, record, self.settings.record_ttl_s)
        except (RedisError, OSError) as exc:
            log.error("could not record completion %s: %r", plan.id, exc)
            raise Unavailable(
                "Could not record the completion (Redis unavailable); try again shortly.",
                retry_after_s=self.settings.retry_after_s,
            ) from exc
        self.metrics.completions.inc()
        self.metrics.tokens.labels("prompt").inc(got.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(got.completion_tokens)
        if len(choices) == 2 and choices[0].text == choices[1].text:
            self.metrics.identical_pairs.inc()
        token = tokens.issue(self.secret, plan.id, principal.key_id, int(record.expires_at))
        return record, token

    def _extension(self, record: CompletionRecord, token: str) -> dict[str, Any]:
        return {
            "feedback_token": token,
            "expires_at": int(record.expires_at),
            "choices": [{"index": c.index, "adapter": c.adapter} for c in record.choices],
        }

    # -- non-streaming ----------------------------------------------------------------------------

    async def complete(self, req: ChatCompletionRequest, principal: Principal) -> dict[str, Any]:
        plan = self.plan(req)
        got = Collected()

        async def run(model: str, indexes: list[int]) -> None:
            async with self._open(self._upstream_body(plan, model, len(indexes), False)) as resp:
                data = json.loads(await resp.read())
            for choice in data["choices"]:
                i = indexes[choice["index"]]
                got.texts[i] = [choice["message"].get("content") or ""]
                got.finish[i] = choice.get("finish_reason")
            usage = data.get("usage") or {}
            got.prompt_tokens += usage.get("prompt_tokens", 0)
            got.completion_tokens += usage.get("completion_tokens", 0)

        with self._hold(plan):
            await asyncio.gather(*(run(m, ix) for m, ix in plan.groups().items()))
        record, token = await self._record(plan, got, req, principal, stream=False)
        return {
            "id": plan.id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.public_model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in record.choices
            ],
            "usage": {
                "prompt_tokens": got.prompt_tokens,
                "completion_tokens": got.completion_tokens,
                "total_tokens": got.prompt_tokens + got.completion_tokens,
            },
            EXTENSION: self._extension(record, token),
        }

    # -- streaming --------------------------------------------------------------------------------

    async def open_stream(self, req: ChatCompletionRequest, principal: Principal) -> AsyncIterator[bytes]:
        """Connect upstream first (so that errors before the first byte still get their status), then stream.

        Returns an async iterator of SSE bytes, to be consumed once; it closes the upstream responses.
        """
        plan = self.plan(req)
        stack = contextlib.AsyncExitStack()
        stack.enter_context(self._hold(plan))  # released when the relay closes the stack
        try:
            streams = [
                (await stack.enter_async_context(self._open(self._upstream_body(plan, model, len(ix), True))), ix)
                for model, ix in plan.groups().items()
            ]
        except BaseException:
            await stack.aclose()
            raise
        return self._relay(plan, streams, stack, req, principal)

    def _chunk(self, plan: Plan, **fields: Any) -> bytes:
        chunk = {
            "id": plan.id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.public_model,
            **fields,
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    async def _relay(
        self,
        plan: Plan,
        streams: list[tuple[aiohttp.ClientResponse, list[int]]],
        stack: contextlib.AsyncExitStack,
        req: ChatCompletionRequest,
        principal: Principal,
    ) -> AsyncIterator[bytes]:
        got = Collected()
        queue: asyncio.Queue[tuple[list[int], dict[str, Any]] | Exception | None] = asyncio.Queue()

        async def pump(resp: aiohttp.ClientResponse, indexes: list[int]) -> None:
            try:
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        await queue.put(None)
                        return
                    await queue.put((indexes, json.loads(data)))
                # a stream cut short (vLLM died) must not be recorded as a complete pair
                raise Unavailable("The inference backend closed the stream before it finished.")
            except Exception as exc:  # handed to the consumer, which decides
                await queue.put(exc)

        async with stack:
            tasks = [asyncio.create_task(pump(r, ix)) for r, ix in streams]
            try:
                remaining = len(tasks)
                while remaining:
                    item = await queue.get()
                    if item is None:
                        remaining -= 1
                        continue
                    if isinstance(item, Exception):
                        raise item
                    indexes, chunk = item
                    if "error" in chunk:
                        message = (chunk["error"] or {}).get("message", "unknown error")
                        raise Unavailable(f"The inference backend failed mid-stream: {message}")
                    usage = chunk.get("usage")
                    if usage and not chunk.get("choices"):
                        got.prompt_tokens += usage.get("prompt_tokens", 0)
                        got.completion_tokens += usage.get("completion_tokens", 0)
                        continue
                    out = []
                    for choice in chunk.get("choices", []):
                        i = indexes[choice["index"]]
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            got.texts.setdefault(i, []).append(delta["content"])
                        if choice.get("finish_reason") is not None:
                            got.finish[i] = choice["finish_reason"]
                        out.append(
                            {"index": i, "delta": delta, "logprobs": None, "finish_reason": choice.get("finish_reason")}
                        )
                    if out:
                        yield self._chunk(plan, choices=out)
                record, token = await self._record(plan, got, req, principal, stream=True)
            except (ServingError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                # The status line is gone already: an error in a stream is a data chunk (as vLLM does it).
                err = exc if isinstance(exc, ServingError) else Unavailable(f"The inference backend failed: {exc!r}")
                log.warning("stream %s failed: %s", plan.id, err.message)
                self.metrics.errors.labels(err.type).inc()
                yield b"data: " + json.dumps(error_body(err.message, err.type, err.code)).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        yield self._chunk(plan, choices=[], **{EXTENSION: self._extension(record, token)})
        if req.stream_options and req.stream_options.include_usage:
            usage = {
                "prompt_tokens": got.prompt_tokens,
                "completion_tokens": got.completion_tokens,
                "total_tokens": got.prompt_tokens + got.completion_tokens,
            }
            yield self._chunk(plan, choices=[], usage=usage)
        yield b"data: [DONE]\n\n"
