"""reranker-svc's HTTP layer in-process, where a real model cannot show the case: a model
that produces non-finite scores (float16 overflow) must not have NaN sorted into a
ranking, and a service without a loaded model answers 503."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ragline_common.service import create_app
from ragline_reranker.api import RerankerState, router
from ragline_reranker.batching import MicroBatcher
from ragline_reranker.scorers import Encoded, Pair


class ConstantScorer:
    """Scores every pair with `value`: a stand-in for a model that overflowed."""

    kind, model_name, device = "cross-encoder", "overflowing", "cpu"
    dtype, max_length, max_batch_tokens, tokenize_once = torch.float16, 512, 2048, True

    def __init__(self, value: float) -> None:
        self.value = value

    def encode(self, pairs: Sequence[Pair]) -> Encoded:
        return Encoded([8] * len(pairs), list(pairs))

    def forward(self, features: list[Any]) -> list[float]:
        return [self.value] * len(features)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return self.forward(list(pairs))


def app_with(scorer: ConstantScorer | None) -> FastAPI:
    state = RerankerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if scorer is not None:
            batcher = MicroBatcher(
                scorer, max_batch_tokens=2048, max_batch_pairs=64, max_queue_pairs=256
            )
            batcher.start()
            state.scorer, state.batcher, state.ready = scorer, batcher, True
        yield
        if state.batcher is not None:
            await state.batcher.close()

    app = create_app("test reranker", lifespan)
    app.state.reranker = state
    app.include_router(router)
    return app


def test_non_finite_scores_are_a_500_not_a_ranking() -> None:
    with TestClient(app_with(ConstantScorer(float("nan")))) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "non_finite_scores"
    assert "DTYPE=float32" in r.json()["error"]["message"]


def test_finite_scores_are_ranked() -> None:
    with TestClient(app_with(ConstantScorer(0.5))) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"], "top_n": 1})
        ready = client.get("/readyz").json()
    assert r.status_code == 200
    assert r.json()["results"] == [{"index": 0, "relevance_score": 0.5, "document": None}]
    assert ready["dtype"] == "float16" and ready["max_batch_tokens"] == 2048


def test_no_model_is_503_not_ready() -> None:
    with TestClient(app_with(None)) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
        ready = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert r.headers["retry-after"] == "5"
    assert ready.status_code == 503
