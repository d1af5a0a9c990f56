"""HTTP routes of reranker-svc: `POST /v1/rerank` and `GET /readyz`.

The rerank body and response are the widely used shape (Cohere, Jina, vLLM, Infinity):
`query`, `documents`, `top_n` → `results: [{index, relevance_score}]`, best first.
`top_n` above the number of documents returns them all, as those servers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import APIRouter, Request

from ragline_common.errors import ApiError, error_response
from ragline_common.responses import JsonResponse
from ragline_common.wire import RerankRequest, RerankResponse, RerankResult
from ragline_reranker.batching import MicroBatcher, Overloaded
from ragline_reranker.scorers import Scorer

router = APIRouter()


@dataclass
class RerankerState:
    scorer: Scorer | None = None
    batcher: MicroBatcher | None = None
    warning: str | None = None
    ready: bool = False


def _state(request: Request) -> RerankerState:
    return request.app.state.reranker


@router.post("/v1/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    state = _state(request)
    if not state.ready or state.batcher is None or state.scorer is None:
        raise ApiError(503, "not_ready", "reranker is not ready", {"Retry-After": "5"})
    try:
        scores = await state.batcher.score([(body.query, doc) for doc in body.documents])
    except Overloaded as exc:
        raise ApiError(
            503, "overloaded", f"reranker overloaded: {exc}", {"Retry-After": "1"}
        ) from None
    if not all(math.isfinite(s) for s in scores):
        # fp16 overflow in some checkpoints; a NaN must not be sorted into a ranking.
        raise ApiError(
            500, "non_finite_scores",
            "the model produced non-finite scores; try RAGLINE_RERANKER_DTYPE=float32",
        )  # fmt: skip
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    return RerankResponse(
        model=state.scorer.model_name,
        results=[
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document={"text": body.documents[i]} if body.return_documents else None,
            )
            for i in order
        ],
    )


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JsonResponse:
    if getattr(request.app.state, "draining", False):  # SIGTERM: leave the load balancer
        return error_response(503, "draining", "service shutting down")
    state = _state(request)
    if not state.ready or state.scorer is None:
        return error_response(503, "not_ready", "model not loaded or service draining")
    body: dict[str, object] = {
        "status": "ready",
        "scorer": state.scorer.kind,
        "model": state.scorer.model_name,
        "device": state.scorer.device,
        "dtype": str(state.scorer.dtype).removeprefix("torch."),
        "max_length": state.scorer.max_length,
        "max_batch_tokens": state.scorer.max_batch_tokens,
        "tokenize_once": state.scorer.tokenize_once,
    }
    if state.warning:
        body["warning"] = state.warning
    return JsonResponse(body)
