"""`POST /v1/retrieve`: lexical and dense search side by side, fused by RRF.

Every hit also carries each backend's own score: BM25 where the lexical search found it,
and its cosine with the query (from the dense search, or for a hit only the lexical
search found, from its stored vector: one lookup by id, nothing embedded). The gateway
ranks by them when no cross-encoder is configured (gateway/ragline_gateway/ranking.py).

Each backend runs as its own task under its own timeout; the query embedding is part of
the dense task, so a model failure degrades dense, not the request. A backend that fails
or times out is reported in `degraded`; both failing is a 503, because an answer built on
no passages is worse than a clear refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal

from ragline_common.errors import ApiError
from ragline_common.wire import Hit, RetrieveRequest, RetrieveResponse
from ragline_retriever.backends.base import CollectionNotFound, ScoredChunk
from ragline_retriever.fusion import reciprocal_rank_fusion
from ragline_retriever.metrics import DEGRADED, SEARCH_SECONDS
from ragline_retriever.runtime import Runtime

log = logging.getLogger("ragline.retriever.search")

Role = Literal["lexical", "dense"]
ROLES: tuple[Role, Role] = ("lexical", "dense")


@dataclass
class Outcome:
    # "off": the backend is not configured (LEXICAL_BACKEND=none), so not searched.
    status: Literal["ok", "not_found", "failed", "off"]
    hits: list[ScoredChunk]
    ms: float
    error: str = ""


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


async def _run(role: Role, work: Awaitable[list[ScoredChunk]], timeout: float) -> Outcome:
    start = time.perf_counter()
    try:
        hits = await asyncio.wait_for(work, timeout)
    except CollectionNotFound:
        return Outcome("not_found", [], _ms(start))
    except TimeoutError:
        error = f"timed out after {timeout}s"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        SEARCH_SECONDS.labels(role).observe(time.perf_counter() - start)
        return Outcome("ok", hits, _ms(start))
    log.warning("%s search failed", role, extra={"backend": role, "error": error[:500]})
    return Outcome("failed", [], _ms(start), error)


async def _dense(
    rt: Runtime, request: RetrieveRequest, depth: int, query_vector: list[list[float]]
) -> list[ScoredChunk]:
    """The dense search; the query embedding is left in `query_vector` for `_dense_scores`."""
    if rt.dense is None:
        raise RuntimeError("dense backend is not open")
    if await rt.written_elsewhere(request.collection):
        rt.dense.written_elsewhere(request.collection)
    vector = await rt.embedder.embed_query(request.query)
    query_vector.append(vector)
    return await rt.dense.search(request.collection, vector, depth, request.filters)


async def _dense_scores(
    rt: Runtime,
    collection: str,
    vector: list[float],
    found: dict[str, float],
    chunk_ids: list[str],
) -> dict[str, float]:
    """Each hit's cosine with the query: from the dense search where it found the chunk,
    else looked up from the chunk's stored vector (one query by id, nothing embedded). A
    failed lookup leaves those hits without a score; the gateway then keeps the fused
    order, so it costs ranking quality, never the answer."""
    scores = {c: found[c] for c in chunk_ids if c in found}
    missing = [c for c in chunk_ids if c not in scores]
    if not missing or rt.dense is None:
        return scores
    try:
        looked_up = await asyncio.wait_for(
            rt.dense.similarities(collection, vector, missing), rt.settings.dense_timeout_s
        )
    except Exception as exc:
        log.warning(
            "dense score lookup failed", extra={"backend": "dense", "error": repr(exc)[:500]}
        )
        return scores
    return scores | looked_up


async def retrieve(rt: Runtime, request: RetrieveRequest) -> RetrieveResponse:
    settings = rt.settings
    start = time.perf_counter()
    lexical_depth = max(settings.lexical_candidates, request.top_k)
    dense_depth = max(settings.dense_candidates, request.top_k)
    query_vector: list[list[float]] = []
    tasks = {
        "dense": asyncio.create_task(
            _run("dense", _dense(rt, request, dense_depth, query_vector), settings.dense_timeout_s)
        ),
    }
    if rt.lexical.name != "none":
        tasks["lexical"] = asyncio.create_task(
            _run(
                "lexical",
                rt.lexical.search(
                    request.collection, request.query, lexical_depth, request.filters
                ),
                settings.lexical_timeout_s,
            )
        )
    try:
        outcomes: dict[Role, Outcome] = {
            role: await tasks[role] if role in tasks else Outcome("off", [], 0.0) for role in ROLES
        }
    finally:
        for task in tasks.values():
            task.cancel()

    ok = [role for role in ROLES if outcomes[role].status == "ok"]
    if not ok:
        if any(o.status == "not_found" for o in outcomes.values()):
            raise ApiError(
                404, "collection_not_found", f"collection {request.collection!r} does not exist"
            )
        raise ApiError(
            503, "retrieval_unavailable", "both retrieval backends failed; try again shortly"
        )
    degraded = [role for role in ROLES if role not in ok and outcomes[role].status != "off"]
    for role in degraded:
        DEGRADED.labels(role).inc()

    fuse_start = time.perf_counter()
    chunks = {}
    for role in ok:
        for scored in outcomes[role].hits:
            chunks.setdefault(scored.chunk.chunk_id, scored.chunk)
    fused = reciprocal_rank_fusion(
        {role: [s.chunk.chunk_id for s in outcomes[role].hits] for role in ok},
        k=settings.rrf_k,
        weights={"lexical": settings.rrf_weight_lexical, "dense": settings.rrf_weight_dense},
    )[: request.top_k]
    timings: dict[str, float] = {f"{role}_ms": outcomes[role].ms for role in ROLES}
    timings["fusion_ms"] = _ms(fuse_start)
    lexical_scores = {s.chunk.chunk_id: s.score for s in outcomes["lexical"].hits}
    dense_scores: dict[str, float] = {}
    if "dense" in ok and query_vector:
        score_start = time.perf_counter()
        dense_scores = await _dense_scores(
            rt,
            request.collection,
            query_vector[0],
            {s.chunk.chunk_id: s.score for s in outcomes["dense"].hits},
            [item.key for item in fused],
        )
        timings["dense_scores_ms"] = _ms(score_start)
    hits = []
    for item in fused:
        chunk = chunks[item.key]
        ranks: dict[Role, int | None] = {role: item.ranks.get(role) for role in ROLES}
        hits.append(
            Hit(
                chunk_id=chunk.chunk_id,
                doc_id=chunk.doc_id,
                text=chunk.text,
                title=chunk.title,
                url=chunk.url,
                source=chunk.source,
                metadata=chunk.metadata,
                score=item.score,
                ranks=ranks,
                scores={
                    "lexical": lexical_scores.get(item.key),
                    "dense": dense_scores.get(item.key),
                },
            )
        )
    timings["total_ms"] = _ms(start)
    return RetrieveResponse(hits=hits, degraded=degraded, timings=timings)
