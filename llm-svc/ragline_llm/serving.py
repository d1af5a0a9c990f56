"""Chat completion logic over an engine, after vLLM's serving_chat.py (no HTTP here).

Streams are built as OpenAI `chat.completion.chunk`s: a role delta first, one chunk per
content delta, a final chunk with `finish_reason`, then (when asked with
`stream_options.include_usage`) a usage chunk with no choices. Non-streamed requests
aggregate the same deltas into one `chat.completion`.

The first delta is awaited before the response starts, so a request the engine refuses
(e.g. `prompt_too_long`) gets a proper HTTP status rather than an error inside a 200
stream. A stream closed before its final chunk (client gone) is counted as an abort; the
engine stream is closed, which stops the generation in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from ragline_common.errors import ApiError
from ragline_llm.engines.base import (
    GENERATION_ABORTS,
    Engine,
    GenerationDelta,
    GenerationRequest,
)
from ragline_llm.protocol import ChatCompletionRequest
from ragline_llm.settings import LlmSettings

log = logging.getLogger("ragline.llm.serving")

TTFT = Histogram(
    "ragline_llm_time_to_first_token_seconds",
    "Time from request arrival to the first generated token",
    ["engine"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INTER_TOKEN = Histogram(
    "ragline_llm_inter_token_seconds",
    "Time between successive generated tokens of one stream",
    ["engine"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
TOKENS = Counter("ragline_llm_tokens_generated_total", "Completion tokens generated", ["engine"])
ACTIVE = Gauge("ragline_llm_active_requests", "Chat completions being served", ["engine"])
ENGINE_REQUESTS = Gauge(
    "ragline_llm_engine_requests",
    "Generations the engine holds (running or queued), read from the engine at scrape time",
    ["engine"],
)

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ConcurrencyLimiter:
    """At most `limit` generations at once; past it, 503 `overloaded` with Retry-After."""

    def __init__(self, limit: int, engine: str) -> None:
        self.limit = limit
        self.active = 0
        self._gauge = ACTIVE.labels(engine)

    def acquire(self) -> Slot:
        if self.active >= self.limit:
            raise ApiError(
                503,
                "overloaded",
                f"{self.active} generations in progress (limit {self.limit}); retry shortly",
                {"Retry-After": "1"},
            )
        self.active += 1
        self._gauge.inc()
        return Slot(self)


class Slot:
    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.active -= 1
            self._limiter._gauge.dec()
            self._limiter = None


class _TokenClock:
    """Feeds TTFT, inter-token and token-count metrics from the deltas of one stream."""

    def __init__(self, engine: str, start: float) -> None:
        self.engine = engine
        self.start = start
        self.last: float | None = None
        self.counted = 0

    def observe(self, delta: GenerationDelta) -> None:
        if delta.completion_tokens > self.counted:
            TOKENS.labels(self.engine).inc(delta.completion_tokens - self.counted)
            self.counted = delta.completion_tokens
        if not delta.text:
            return
        now = time.perf_counter()
        if self.last is None:
            TTFT.labels(self.engine).observe(now - self.start)
        else:
            INTER_TOKEN.labels(self.engine).observe(now - self.last)
        self.last = now


class ChatStream:
    """The SSE body of one streamed completion. `aclose()` must be called when the response
    ends, however it ends (the router does it); closing before completion is an abort."""

    def __init__(
        self,
        serving: ChatServing,
        request: ChatCompletionRequest,
        gen: AsyncIterator[GenerationDelta],
        first: GenerationDelta,
        clock: _TokenClock,
        slot: Slot,
        completion_id: str,
    ) -> None:
        self._serving = serving
        self._request = request
        self._gen = gen
        self._first = first
        self._clock = clock
        self._slot = slot
        self._id = completion_id
        self._created = int(time.time())
        self.completed = False
        self._closed = False
        self._frames_gen: Any = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._frames_gen is None:
            self._frames_gen = self._frames()
        return self._frames_gen

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._serving.engine.model_name,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }

    async def _frames(self) -> AsyncIterator[bytes]:
        include_usage = bool(
            self._request.stream_options and self._request.stream_options.include_usage
        )
        try:
            yield sse_frame(self._chunk({"role": "assistant", "content": ""}))
            delta: GenerationDelta | None = self._first
            last = self._first
            while delta is not None:
                last = delta
                self._clock.observe(delta)
                if delta.text:
                    yield sse_frame(self._chunk({"content": delta.text}))
                if delta.finish_reason:
                    break
                delta = await anext(self._gen, None)
            yield sse_frame(self._chunk({}, last.finish_reason or "stop"))
            if include_usage:
                usage = _usage(last)
                yield sse_frame({**self._chunk({}), "choices": [], "usage": usage})
            yield DONE_FRAME
            self.completed = True
        except ApiError as exc:  # an engine refusal after the headers went out
            log.warning("generation failed mid-stream", extra={"code": exc.code})
            self.completed = True
            yield sse_frame({"error": {"code": exc.code, "message": exc.message}})
            yield DONE_FRAME
        except Exception:
            log.exception("generation failed mid-stream")
            self.completed = True
            yield sse_frame({"error": {"code": "engine_error", "message": "generation failed"}})
            yield DONE_FRAME

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.completed:
                GENERATION_ABORTS.labels(self._serving.engine.name).inc()
                log.info("client went away; generation aborted", extra={"id": self._id})
            if self._frames_gen is not None:
                await self._frames_gen.aclose()
            await _aclose(self._gen)
        finally:
            self._slot.release()


class ChatServing:
    def __init__(self, engine: Engine, settings: LlmSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.limiter = ConcurrencyLimiter(settings.max_concurrency, engine.name)
        GENERATION_ABORTS.labels(engine.name)  # export the series at 0 from the start
        ENGINE_REQUESTS.labels(engine.name).set_function(engine.unfinished_requests)

    def _generation_request(self, req: ChatCompletionRequest, request_id: str) -> GenerationRequest:
        unsupported = req.unsupported()
        if unsupported:
            raise ApiError(400, "unsupported_parameter", unsupported)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(
                400,
                "max_tokens_too_large",
                f"max_tokens is {max_tokens}; this server allows at most "
                f"{self.settings.max_tokens_limit}",
            )
        return GenerationRequest(
            request_id=request_id,
            messages=req.messages,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
            response_format=req.response_format,
            reasoning_effort=req.reasoning_effort,
        )

    async def _open(
        self, req: ChatCompletionRequest
    ) -> tuple[str, AsyncIterator[GenerationDelta], GenerationDelta, _TokenClock, Slot]:
        if not self.engine.ready:
            raise ApiError(503, "not_ready", "engine is not ready", {"Retry-After": "5"})
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        greq = self._generation_request(req, completion_id)
        slot = self.limiter.acquire()
        clock = _TokenClock(self.engine.name, time.perf_counter())
        gen = self.engine.stream(greq)
        try:
            first = await anext(gen, None)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                GENERATION_ABORTS.labels(self.engine.name).inc()
            await _aclose(gen)
            slot.release()
            raise
        if first is None:
            first = GenerationDelta("", "stop")
        return completion_id, gen, first, clock, slot

    async def stream(self, req: ChatCompletionRequest) -> ChatStream:
        completion_id, gen, first, clock, slot = await self._open(req)
        return ChatStream(self, req, gen, first, clock, slot, completion_id)

    async def complete(self, req: ChatCompletionRequest) -> dict[str, Any]:
        completion_id, gen, first, clock, slot = await self._open(req)
        parts: list[str] = []
        last = first
        try:
            delta: GenerationDelta | None = first
            while delta is not None:
                last = delta
                clock.observe(delta)
                parts.append(delta.text)
                if delta.finish_reason:
                    break
                delta = await anext(gen, None)
        except asyncio.CancelledError:
            GENERATION_ABORTS.labels(self.engine.name).inc()
            raise
        finally:
            await _aclose(gen)
            slot.release()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.engine.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "finish_reason": last.finish_reason or "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(last),
        }

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.engine.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "ragline",
                }
            ],
        }


def _usage(delta: GenerationDelta) -> dict[str, int]:
    return {
        "prompt_tokens": delta.prompt_tokens,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


async def _aclose(gen: AsyncIterator[GenerationDelta]) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()
