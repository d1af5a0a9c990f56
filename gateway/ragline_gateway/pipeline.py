"""The answer pipeline of ARCHITECTURE.md, top to bottom.

`prepare` runs everything that can still end in a plain HTTP error (steps 1-3 and opening
the generation stream), so a client gets a 4xx/503 instead of a stream that dies at once.
`events` then yields the answer as events (steps 4-6); the endpoints render them as native
SSE or as OpenAI chunks.

    1. admit            (admission.py; done by the endpoint before `prepare`)
    2. concurrently     answer-cache lookup + history load + retrieval; a hit ends it here
    3. rank             fused candidates → top n (ranking.py: the reranker, or without a
                        cross-encoder the blend of the retriever's own scores), fused
                        order if the reranker fails; then the relevance cut-off
    4. sources          sent before the first token
    5. generate         prompt → llm-svc stream, each token relayed at once
    6. finish           cache and history written in the background

A question without the knowledge base (`Question.knowledge_base` false: an OpenAI client
asked for the generation model itself) skips 2-4 and 6: its messages go to llm-svc as
the client sent them, with no sources, no cache and no memory, through the same
admission, timeouts, relay and metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from ragline_common.errors import ApiError
from ragline_common.logs import request_id_var
from ragline_common.passages import Passage
from ragline_common.wire import Filters, Hit, RetrieveResponse
from ragline_gateway import metrics
from ragline_gateway.cache import AnswerCache, CachedAnswer, cache_key
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.llm import Delta, LlmClient, LlmStream
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.clients.retriever import RetrieverClient
from ragline_gateway.feed import QUIET, Feed
from ragline_gateway.memory import ConversationMemory, Turn
from ragline_gateway.prompt import SYSTEM_PROMPT, build_messages, fit_history
from ragline_gateway.ranking import Cutoff, Ranking, blend, resolve
from ragline_gateway.rewrite import QueryRewriter
from ragline_gateway.settings import GatewaySettings

log = logging.getLogger("ragline.pipeline")

Event = tuple[str, Any]  # ("meta" | "sources" | "token" | "ping" | "done" | "error", payload)


class _ShuttingDown:
    """Put in an answer's feed when the replica's shutdown grace runs out."""


# What the reader task hands to `events`: a delta, the error that ended the stream, the end
# (None), or the replica shutting down.
AnswerFeed = Feed[Delta | BaseException | _ShuttingDown | None]


# Part of every cache key: a changed prompt must not serve answers made with the old one.
PROMPT_VERSION = hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:12]


@dataclass
class Question:
    text: str
    collection: str
    endpoint: str
    tenant: str = "local"
    filters: Filters = field(default_factory=dict)
    top_k: int | None = None
    # Cut-off rules this request sets (protocol.cutoff_overrides): Cutoff field → value.
    cutoff: dict[str, float | None] = field(default_factory=dict)
    conversation_id: str | None = None
    # Whose conversations `conversation_id` names (auth.Caller.conversation_scope): the key
    # and collection with keys, the tenant without; memory is keyed on both.
    memory_scope: str = "local"
    # OpenAI clients send the history in `messages`; then memory is neither read nor
    # written (an Open WebUI chat id is only the answer's conversation id).
    history: list[Turn] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    # False: `messages` go straight to the generation model (no retrieval, no sources).
    knowledge_base: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)


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
    stream: LlmStream | None  # None for an answer from the cache
    started: float
    cached: CachedAnswer | None = None
    cache_key: str | None = None  # where to store this answer once complete
    search_query: str = ""  # what was searched for a follow-up, when not the question itself


def _generation_unavailable() -> ApiError:
    return ApiError(
        503, "generation_unavailable", "the answer generator is unavailable; please retry shortly",
        headers={"Retry-After": "5"},
    )  # fmt: skip


def _memory_id(q: Question, conversation_id: str) -> str:
    """Where a conversation's turns are kept: its owner's scope, then the id the client
    gave, so that no caller reaches another's conversation by sending its id."""
    return f"{q.memory_scope}:{conversation_id}"


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
        cache: AnswerCache | None,
    ) -> None:
        self.settings = settings
        self.retriever = retriever
        self.reranker = reranker
        self.llm = llm
        self.memory = memory
        self.cache = cache
        self.rewriter = QueryRewriter(
            settings.query_rewrite, llm, settings.rewrite_timeout_s, settings.rewrite_max_tokens
        )
        self.llm_model = settings.llm_model
        self._background: set[asyncio.Task[None]] = set()
        self._open_streams: set[AnswerFeed] = set()

    # --- steps 2, 3 and the opening of 5: everything that may still be a plain HTTP error --

    async def prepare(self, q: Question) -> PreparedAnswer:
        if not q.knowledge_base:
            return await self._prepare_direct(q)
        started = time.perf_counter()
        degraded: list[str] = []
        timings: dict[str, float] = {}
        conversation_id = q.conversation_id or uuid.uuid4().hex

        # 2. Cache, history and retrieval side by side. Retrieval starts at once on the
        #    question as asked; a cache hit on a first turn cancels it; if history shows a
        #    follow-up, retrieval is redone on the self-contained query.
        retrieval = asyncio.create_task(self._retrieve(q, q.text))
        lookup = asyncio.create_task(self._cache_lookup(q)) if self._cacheable(q) else None
        key: str | None = None
        try:
            history = await self._history(q, conversation_id, degraded)
            if lookup is not None and not history:
                key, hit = await lookup
                if hit is not None:
                    timings["prepare_ms"] = _ms(started)
                    sources = [Source(**s) for s in hit.sources]
                    return PreparedAnswer(
                        q, conversation_id, sources, [], timings, None, started, hit, None
                    )
            rewrite_start = time.perf_counter()
            query = await self.rewriter.standalone(q.text, history, self.llm_model, degraded)
            if query != q.text:
                timings["rewrite_ms"] = _ms(rewrite_start)
                retrieval.cancel()
                retrieval = asyncio.create_task(self._retrieve(q, query))
            found = await retrieval
        finally:
            retrieval.cancel()
            if lookup is not None:
                lookup.cancel()
        timings["retrieve_ms"] = _ms(started)
        timings.update({f"retrieve_{k}": v for k, v in found.timings.items()})
        degraded.extend(found.degraded)

        # A generator known to be down (its health probes go unanswered) would only fail
        # the answer after the rerank: refuse now and spare the reranker the work.
        if self.llm.known_down:
            metrics.UPSTREAM_ERRORS.labels("llm").inc()
            raise _generation_unavailable()

        # 3. Rank the candidates (the reranker, or the blend without a cross-encoder; on a
        #    reranker failure the fused order), then drop sources far below the top one.
        rerank_start = time.perf_counter()
        top_n = q.top_k or self.settings.rerank_top_n
        ranking = await self.ranking()
        if ranking == "reranker":
            top, ranking = await self._rerank(query, found.hits, top_n, degraded)
        elif ranking == "blend":
            top = blend(found.hits, self.settings.blend_lexical_weight)[:top_n]
        else:
            top = [(h, h.score) for h in found.hits[:top_n]]
        top = self.cutoff(ranking, q.cutoff).apply(top)
        timings["rerank_ms"] = _ms(rerank_start)
        metrics.STAGE_DURATION.labels("rerank").observe(time.perf_counter() - rerank_start)
        sources = [
            Source(n, h.doc_id, h.chunk_id, h.title, h.url, h.text, round(score, 6))
            for n, (h, score) in enumerate(top, start=1)
        ]

        # 5 (opening). Build the prompt and open the generation stream.
        passages = [Passage(s.n, s.title, s.text) for s in sources]
        messages = build_messages(q.text, passages, history)
        stream = await self._open_generation(messages, q.sampling)
        timings["prepare_ms"] = _ms(started)
        for stage in degraded:
            metrics.DEGRADED_ANSWERS.labels(stage).inc()
        prepared = PreparedAnswer(
            q, conversation_id, sources, degraded, timings, stream, started, None, key
        )
        if query != q.text:
            prepared.search_query = query
        return prepared

    async def _prepare_direct(self, q: Question) -> PreparedAnswer:
        """The generation model itself: the client's messages, straight to llm-svc."""
        started = time.perf_counter()
        if self.llm.known_down:
            metrics.UPSTREAM_ERRORS.labels("llm").inc()
            raise _generation_unavailable()
        stream = await self._open_generation(q.messages, q.sampling)
        timings = {"prepare_ms": _ms(started)}
        return PreparedAnswer(q, q.conversation_id or "", [], [], timings, stream, started)

    async def generation_model(self) -> str:
        """The name llm-svc serves (LLM_MODEL, else asked once); 503 while unknowable."""
        if not self.llm_model:
            try:
                self.llm_model = await self.llm.model_name(self.settings.llm_connect_timeout_s)
            except (UpstreamError, KeyError, IndexError, TypeError) as exc:
                metrics.UPSTREAM_ERRORS.labels("llm").inc()
                raise _generation_unavailable() from exc
        return self.llm_model

    async def ranking(self) -> Ranking:
        """The ranking of step 3 now (ranking.resolve); `auto` asks the reranker what it
        scores with while that is unknown."""
        scorer = self.reranker.scorer
        if self.settings.ranking == "auto" and scorer is None:
            scorer = await self.reranker.learn_scorer(min(self.settings.rerank_timeout_s, 2.0))
        return resolve(self.settings.ranking, scorer)

    def cutoff(self, ranking: Ranking, overrides: dict[str, float | None]) -> Cutoff:
        """The relevance cut-off on `ranking`'s scores: the settings', with a request's
        overrides. None on the fused order, whose scores are ranks in disguise."""
        s = self.settings
        if ranking == "fused":
            return Cutoff()
        if ranking == "blend":
            rules: dict[str, float | None] = {
                "max_drop": s.blend_max_drop, "min_score": s.blend_min_score
            }  # fmt: skip
        else:
            rules = {"max_drop": s.reranker_max_drop, "min_score": s.reranker_min_score}
        return Cutoff(**(rules | overrides))

    def ranking_status(self) -> dict[str, Any]:
        """For /readyz: the ranking in use now, why, and its cut-off."""
        setting, scorer = self.settings.ranking, self.reranker.scorer
        in_use = resolve(setting, scorer)
        cutoff = self.cutoff(in_use, {})
        return {
            "in_use": in_use,
            "setting": setting,
            "reranker_scorer": scorer,
            "cutoff": {"max_drop": cutoff.max_drop, "min_score": cutoff.min_score},
        }

    def _cacheable(self, q: Question) -> bool:
        return self.cache is not None and not q.history

    def _generation_settings(self, q: Question) -> dict[str, Any]:
        # The ranking and the cut-off choose the sources, so they are part of the key.
        ranking = resolve(self.settings.ranking, self.reranker.scorer)
        return {
            "model": self.llm_model,
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
            **{k: v for k, v in q.sampling.items() if v is not None},
            "top_k": q.top_k or self.settings.rerank_top_n,
            "candidates": self.settings.retrieve_candidates,
            "ranking": ranking,
            "blend_lexical_weight": self.settings.blend_lexical_weight,
            "cutoff": asdict(self.cutoff(ranking, q.cutoff)),
            "prompt": PROMPT_VERSION,
        }

    async def _cache_lookup(self, q: Question) -> tuple[str | None, CachedAnswer | None]:
        """(key to store the answer under, cached answer); (None, None) when the cache or
        the index version cannot be had, which only costs the cache."""
        assert self.cache is not None
        try:
            if not self.llm_model:  # part of the key: resolve it before the first lookup
                self.llm_model = await self.llm.model_name(self.settings.llm_connect_timeout_s)
            with anyio.fail_after(self.settings.redis_timeout_s * 2):
                version = await self.retriever.index_version(
                    q.collection, self.settings.redis_timeout_s
                )
                key = cache_key(
                    tenant=q.tenant,
                    collection=q.collection,
                    question=q.text,
                    filters=q.filters,
                    generation=self._generation_settings(q),
                    index_version=version,
                )
                hit = await self.cache.get(key)
        except Exception as exc:
            metrics.CACHE_LOOKUPS.labels("error").inc()
            log.warning("answer cache unavailable", extra={"error": repr(exc)})
            return None, None
        metrics.CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()
        return key, hit

    async def _history(self, q: Question, conversation_id: str, degraded: list[str]) -> list[Turn]:
        turns, budget = self.settings.history_turns, self.settings.history_token_budget
        if q.history is not None:
            return fit_history(q.history[-turns:], budget) if turns else []
        if q.conversation_id is None:
            return []
        try:
            with anyio.fail_after(self.settings.redis_timeout_s):
                loaded = await self.memory.load(_memory_id(q, conversation_id), turns)
        except Exception as exc:  # Redis down or slow: answer without memory
            log.warning("memory unavailable, answering without history", extra={"error": repr(exc)})
            degraded.append("memory")
            metrics.REDIS_ERRORS.labels("memory").inc()
            return []
        return fit_history(loaded, budget)

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
    ) -> tuple[list[tuple[Hit, float]], Ranking]:
        """The reranker's top `top_n`, or on its failure the fused order; and which it is."""
        if not hits:
            return [], "reranker"
        try:
            ranked = await self.reranker.rerank(
                query, [h.text for h in hits], min(top_n, len(hits)),
                timeout=self.settings.rerank_timeout_s,
            )  # fmt: skip
            return [(hits[i], score) for i, score in ranked], "reranker"
        except (UpstreamError, KeyError, IndexError, TypeError, ValueError) as exc:
            metrics.UPSTREAM_ERRORS.labels("reranker").inc()
            log.warning("rerank failed, using fused order", extra={"error": str(exc)})
            degraded.append("rerank")
            return [(h, h.score) for h in hits[:top_n]], "fused"

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
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                # The request itself was refused: retrying it would not help.
                raise ApiError(
                    exc.status, exc.error_code or "bad_request", exc.error_message
                ) from exc
            raise _generation_unavailable() from exc

    # --- steps 4, 5 and 6: the answer as events ----------------------------------------

    async def events(self, p: PreparedAnswer) -> AsyncIterator[Event]:
        yield "meta", {"request_id": request_id_var.get(), "conversation_id": p.conversation_id}
        yield "sources", {"sources": [s.as_dict() for s in p.sources]}
        if p.cache_key is None and p.question.endpoint == "api_chat":
            # Sent, and read by nothing else on this endpoint (the OpenAI one annotates
            # citations from them, the cache stores them): the passages' texts need not
            # be held for the whole stream.
            p.sources = []
        if p.cached is not None:
            async for event in self._replay(p, p.cached):
                yield event
            return
        assert p.stream is not None

        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason = "stop"
        # One reader task feeds a queue, so that a quiet upstream can be noticed (for
        # `: ping` and the idle limit) without cancelling a read inside httpx's stream.
        queue: AnswerFeed = Feed(256, quiet_after=self.settings.keepalive_interval_s)
        reader = asyncio.create_task(self._read(p.stream, queue))
        self._open_streams.add(queue)
        last = first = 0.0
        completed = False
        try:
            idle_limit = self.settings.llm_first_token_timeout_s
            idle_since = time.perf_counter()
            while True:
                item = await queue.get()
                if type(item) is not Delta:
                    if item is QUIET:
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
                    if isinstance(item, _ShuttingDown):
                        yield (
                            "error",
                            {
                                "code": "shutting_down",
                                "message": "the server is restarting; ask again",
                            },
                        )
                        return
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
                # Deltas already read behind this one go out with it: one event and one
                # write to the client, not one per token. That happens when the gateway
                # is behind the generator (under load, where it saves most) or when the
                # upstream sends several tokens in one write; otherwise nothing is held.
                text = item.text
                usage = item.usage or usage
                finish_reason = item.finish_reason or finish_reason
                for delta in queue.take_ready(Delta):
                    text += delta.text
                    usage = delta.usage or usage
                    finish_reason = delta.finish_reason or finish_reason
                if text:
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
                    parts.append(text)
                    if len(parts) == 16:  # one string, not a string object per token
                        parts[:] = ["".join(parts)]
                    yield "token", text
            completed = True
            metrics.STAGE_DURATION.labels("generate").observe(
                time.perf_counter() - p.started - p.timings["prepare_ms"] / 1000
            )
            answer = "".join(parts)
            self._finish(p, answer)  # step 6 starts before `done`: read-your-writes
            # Stored before `done` (bounded by the Redis timeout): a client that repeats the
            # question once it has the answer finds it cached.
            await self._store(p, CachedAnswer(answer, [s.as_dict() for s in p.sources], usage,
                                              finish_reason))  # fmt: skip
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
                    **({"search_query": p.search_query} if p.search_query else {}),
                },
            )
        except asyncio.CancelledError:
            metrics.CLIENT_DISCONNECTS.inc()
            raise
        finally:
            self._open_streams.discard(queue)
            queue.close()
            reader.cancel()
            with anyio.CancelScope(shield=True):
                await p.stream.aclose()  # closing the upstream aborts the generation there
            metrics.ANSWERS.labels("completed" if completed else "incomplete").inc()

    async def _replay(self, p: PreparedAnswer, hit: CachedAnswer) -> AsyncIterator[Event]:
        """A cached answer: the same events as a live one, the text as one token."""
        if hit.answer:
            yield "token", hit.answer
        self._finish(p, hit.answer)
        p.timings["ttft_ms"] = p.timings["total_ms"] = _ms(p.started)
        metrics.TIME_TO_FIRST_TOKEN.labels(p.question.endpoint).observe(
            time.perf_counter() - p.started
        )
        metrics.ANSWERS.labels("cached").inc()
        yield (
            "done",
            {
                "usage": hit.usage,
                "timings": p.timings,
                "degraded": [],
                "cached": True,
                "finish_reason": hit.finish_reason,
            },
        )

    def end_open_streams(self) -> None:
        """The shutdown grace is running out: every open answer ends with an `error` event
        now, rather than being cut off mid-frame a moment later."""
        for queue in list(self._open_streams):
            queue.put_nowait(_ShuttingDown())  # dropped when full: a reader that far behind is cut

    @staticmethod
    async def _read(stream: LlmStream, queue: AnswerFeed) -> None:
        try:
            async for delta in stream.deltas():
                await queue.put(delta)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(exc)

    # --- step 6: after the answer, off the response path ---------------------------------

    def _background_task(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish(self, p: PreparedAnswer, answer: str) -> None:
        q = p.question
        if not q.knowledge_base or q.history is not None or "memory" in p.degraded:
            return
        memory_id = _memory_id(q, p.conversation_id)
        self._background_task(self._remember(memory_id, Turn(q.text, answer)))

    async def _store(self, p: PreparedAnswer, answer: CachedAnswer) -> None:
        """Only whole, undegraded answers are cached: a degraded one is worse than what the
        next asker would get, and would outlive the outage that caused it."""
        if p.cache_key is None or p.degraded or not answer.answer:
            return
        await self._cache_put(p.cache_key, answer)

    async def _remember(self, memory_id: str, turn: Turn) -> None:
        try:
            with anyio.fail_after(self.settings.redis_timeout_s * 4):
                await self.memory.append(memory_id, turn, self.settings.history_turns)
        except Exception as exc:
            metrics.REDIS_ERRORS.labels("memory").inc()
            log.warning("could not store conversation turn", extra={"error": repr(exc)})

    async def _cache_put(self, key: str, answer: CachedAnswer) -> None:
        assert self.cache is not None
        try:
            with anyio.fail_after(self.settings.redis_timeout_s):
                await self.cache.put(key, answer)
        except Exception as exc:
            metrics.REDIS_ERRORS.labels("cache").inc()
            log.warning("could not store the answer in the cache", extra={"error": repr(exc)})
