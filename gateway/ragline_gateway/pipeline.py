"""The answer pipeline of ARCHITECTURE.md, top to bottom.

`prepare` runs everything that can still end in a plain HTTP error (steps 1-3 and opening
the generation stream), so a client gets a 4xx/503 instead of a stream that dies at once.
`events` then yields the answer as events (steps 4-6); the endpoints render them as native
SSE or as OpenAI chunks.

    1. admit            (admission.py; done by the endpoint before `prepare`)
    2. concurrently     history load + retrieval
    3. rerank           fused candidates → top n, fused order if the reranker fails
    4. sources          sent before the first token
    5. generate         prompt → llm-svc stream, each token relayed at once
    6. finish           history written in the background
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from ragline_common.errors import ApiError
from ragline_common.logs import request_id_var
from ragline_common.passages import Passage
from ragline_common.wire import Filters, Hit, RetrieveResponse
from ragline_gateway import metrics
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.llm import Delta, LlmClient, LlmStream
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.clients.retriever import RetrieverClient
from ragline_gateway.memory import ConversationMemory, Turn
from ragline_gateway.prompt import build_messages, standalone_query
from ragline_gateway.settings import GatewaySettings

log = logging.getLogger("ragline.pipeline")

Event = tuple[str, Any]  # ("meta" | "sources" | "token" | "ping" | "done" | "error", payload)


@dataclass
class Question:
    text: str
    collection: str
    endpoint: str
    filters: Filters = field(default_factory=dict)
    top_k: int | None = None
    conversation_id: str | None = None
    # OpenAI clients send the history in `messages`; then memory is not read.
    history: list[Turn] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    n: int
    doc_id: str
    chunk_id: str
    title: str
    url: str
    text: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__


@dataclass
class PreparedAnswer:
    question: Question
    conversation_id: str
    sources: list[Source]
    degraded: list[str]
    timings: dict[str, float]
    stream: LlmStream
    started: float


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class AnswerPipeline:
    def __init__(
        self,
        settings: GatewaySettings,
        retriever: RetrieverClient,
        reranker: RerankerClient,
        llm: LlmClient,
        memory: ConversationMemory,
    ) -> None:
        self.settings = settings
        self.retriever = retriever
        self.reranker = reranker
        self.llm = llm
        self.memory = memory
        self.llm_model = settings.llm_model
        self._background: set[asyncio.Task[None]] = set()

    # --- steps 2, 3 and the opening of 5: everything that may still be a plain HTTP error --

    async def prepare(self, q: Question) -> PreparedAnswer:
        started = time.perf_counter()
        degraded: list[str] = []
        timings: dict[str, float] = {}
        conversation_id = q.conversation_id or uuid.uuid4().hex

        # 2. History and retrieval side by side. Retrieval starts at once on the question as
        #    asked; if history shows a follow-up, it is redone on the self-contained query.
        retrieval = asyncio.create_task(self._retrieve(q, q.text))
        try:
            history = await self._history(q, conversation_id, degraded)
            query = standalone_query(q.text, history)
            if query != q.text:
                retrieval.cancel()
                retrieval = asyncio.create_task(self._retrieve(q, query))
            found = await retrieval
        finally:
            retrieval.cancel()
        timings["retrieve_ms"] = _ms(started)
        timings.update({f"retrieve_{k}": v for k, v in found.timings.items()})
        degraded.extend(found.degraded)

        # 3. Rerank the fused candidates; on failure keep the fused order.
        rerank_start = time.perf_counter()
        top = await self._rerank(query, found.hits, q.top_k or self.settings.rerank_top_n, degraded)
        timings["rerank_ms"] = _ms(rerank_start)
        sources = [
            Source(n, h.doc_id, h.chunk_id, h.title, h.url, h.text, round(score, 6))
            for n, (h, score) in enumerate(top, start=1)
        ]

        # 5 (opening). Build the prompt and open the generation stream.
        messages = build_messages(q.text, [Passage(s.n, s.title, s.text) for s in sources], history)
        stream = await self._open_generation(messages, q.sampling)
        timings["prepare_ms"] = _ms(started)
        for stage in degraded:
            metrics.DEGRADED_ANSWERS.labels(stage).inc()
        return PreparedAnswer(q, conversation_id, sources, degraded, timings, stream, started)

    async def _history(self, q: Question, conversation_id: str, degraded: list[str]) -> list[Turn]:
        if q.history is not None:
            return q.history[-self.settings.history_turns :] if self.settings.history_turns else []
        if q.conversation_id is None:
            return []
        try:
            with anyio.fail_after(self.settings.memory_timeout_s):
                return await self.memory.load(conversation_id, self.settings.history_turns)
        except Exception as exc:  # Redis down or slow: answer without memory
            log.warning("memory unavailable, answering without history", extra={"error": repr(exc)})
            degraded.append("memory")
            return []

    async def _retrieve(self, q: Question, query: str) -> RetrieveResponse:
        start = time.perf_counter()
        try:
            return await self.retriever.retrieve(
                query, q.collection, self.settings.retrieve_candidates, q.filters,
                timeout=self.settings.retrieve_timeout_s,
            )  # fmt: skip
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels("retriever").inc()
            if exc.status is not None and 400 <= exc.status < 500:
                raise ApiError(
                    exc.status, exc.error_code or "bad_request", exc.error_message
                ) from exc
            raise ApiError(
                503, "retrieval_unavailable",
                "the document index is unavailable; please retry shortly",
                headers={"Retry-After": "5"},
            ) from exc  # fmt: skip
        finally:
            metrics.STAGE_DURATION.labels("retrieve").observe(time.perf_counter() - start)

    async def _rerank(
        self, query: str, hits: list[Hit], top_n: int, degraded: list[str]
    ) -> list[tuple[Hit, float]]:
        if not hits:
            return []
        start = time.perf_counter()
        try:
            ranked = await self.reranker.rerank(
                query, [h.text for h in hits], min(top_n, len(hits)),
                timeout=self.settings.rerank_timeout_s,
            )  # fmt: skip
            return [(hits[i], score) for i, score in ranked]
        except (UpstreamError, KeyError, IndexError, TypeError, ValueError) as exc:
            metrics.UPSTREAM_ERRORS.labels("reranker").inc()
            log.warning("rerank failed, using fused order", extra={"error": str(exc)})
            degraded.append("rerank")
            return [(h, h.score) for h in hits[:top_n]]
        finally:
            metrics.STAGE_DURATION.labels("rerank").observe(time.perf_counter() - start)

    async def _open_generation(
        self, messages: list[dict[str, str]], sampling: dict[str, Any]
    ) -> LlmStream:
        params = {
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
            **{k: v for k, v in sampling.items() if v is not None},
        }
        try:
            if not self.llm_model:
                self.llm_model = await self.llm.model_name()
            return await self.llm.open_stream(
                messages,
                model=self.llm_model,
                sampling=params,
                connect_timeout=self.settings.llm_connect_timeout_s,
                read_timeout=max(
                    self.settings.llm_first_token_timeout_s, self.settings.llm_idle_timeout_s
                ),
            )
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels("llm").inc()
            if exc.status == 400:
                raise ApiError(400, exc.error_code or "bad_request", exc.error_message) from exc
            raise ApiError(
                503, "generation_unavailable",
                "the answer generator is unavailable; please retry shortly",
                headers={"Retry-After": "5"},
            ) from exc  # fmt: skip

    # --- steps 4, 5 and 6: the answer as events ----------------------------------------

    async def events(self, p: PreparedAnswer) -> AsyncIterator[Event]:
        yield "meta", {"request_id": request_id_var.get(), "conversation_id": p.conversation_id}
        yield "sources", {"sources": [s.as_dict() for s in p.sources]}

        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason = "stop"
        # One reader task feeds a queue so that waiting for the next token can time out
        # (for `: ping` and the idle limit) without cancelling a read inside httpx's stream.
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue(maxsize=256)
        reader = asyncio.create_task(self._read(p.stream, queue))
        last = first = 0.0
        completed = False
        try:
            idle_limit = self.settings.llm_first_token_timeout_s
            idle_since = time.perf_counter()
            while True:
                try:
                    async with asyncio.timeout(self.settings.keepalive_interval_s):
                        item = await queue.get()
                except TimeoutError:
                    if time.perf_counter() - idle_since > idle_limit:
                        yield (
                            "error",
                            {
                                "code": "generation_timeout",
                                "message": "the answer generator stopped responding",
                            },
                        )
                        return
                    yield "ping", None
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    metrics.UPSTREAM_ERRORS.labels("llm").inc()
                    log.warning("generation failed mid-stream", extra={"error": repr(item)})
                    yield (
                        "error",
                        {
                            "code": "generation_failed",
                            "message": "the answer generator failed mid-answer",
                        },
                    )
                    return
                if item.usage:
                    usage = item.usage
                if item.finish_reason:
                    finish_reason = item.finish_reason
                if item.text:
                    now = time.perf_counter()
                    if first:
                        metrics.INTER_TOKEN.observe(now - last)
                    else:
                        first = now
                        metrics.TIME_TO_FIRST_TOKEN.labels(p.question.endpoint).observe(
                            now - p.started
                        )
                        idle_limit = self.settings.llm_idle_timeout_s
                    last = idle_since = now
                    parts.append(item.text)
                    yield "token", item.text
            completed = True
            self._finish(p, "".join(parts))  # step 6 starts before `done`: read-your-writes
            p.timings["ttft_ms"] = round((first - p.started) * 1000, 2) if first else 0.0
            p.timings["total_ms"] = _ms(p.started)
            yield (
                "done",
                {
                    "usage": usage,
                    "timings": p.timings,
                    "degraded": p.degraded,
                    "cached": False,
                    "finish_reason": finish_reason,
                },
            )
        except asyncio.CancelledError:
            metrics.CLIENT_DISCONNECTS.inc()
            raise
        finally:
            reader.cancel()
            with anyio.CancelScope(shield=True):
                await p.stream.aclose()  # closing the upstream aborts the generation there
            metrics.ANSWERS.labels("completed" if completed else "incomplete").inc()

    @staticmethod
    async def _read(stream: LlmStream, queue: asyncio.Queue[Delta | BaseException | None]) -> None:
        try:
            async for delta in stream.deltas():
                await queue.put(delta)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(exc)

    # --- step 6: after the answer, off the response path ---------------------------------

    def _finish(self, p: PreparedAnswer, answer: str) -> None:
        if p.question.history is not None or "memory" in p.degraded:
            return
        task = asyncio.create_task(self._remember(p.conversation_id, Turn(p.question.text, answer)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remember(self, conversation_id: str, turn: Turn) -> None:
        try:
            with anyio.fail_after(self.settings.memory_timeout_s * 4):
                await self.memory.append(conversation_id, turn, self.settings.history_turns)
        except Exception as exc:
            log.warning("could not store conversation turn", extra={"error": repr(exc)})
