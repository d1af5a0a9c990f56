"""Reranker client: the widely used rerank shape by default, Hugging Face TEI by setting.

`rerank` (default) speaks what reranker-svc, vLLM (`/v1/rerank`), Jina, Cohere and
Infinity serve: `{model?, query, documents, top_n}` → `{results: [{index,
relevance_score}]}`. `tei` speaks text-embeddings-inference's `/rerank`: `{query, texts,
truncate}` → `[{index, score}]`. Either way the pipeline gets (index, score) pairs, best
first, and any malformed answer becomes an `UpstreamError` (the pipeline then degrades to
the fused order).

What the reranker scores with is learned from its health answers (`scorer`): reranker-svc's
/readyz says `cross-encoder` or `bi-encoder` (no trained cross-encoder configured; the
gateway's `auto` ranking then skips it, ranking.py); any other ready answer (TEI's or
vLLM's /health) counts as `external`, a real reranker.

Servers cap the documents of one request (TEI's `--max-client-batch-size` defaults to
32, fewer than the gateway's 50 candidates), so larger lists are split into concurrent
requests and merged: cross-encoder scores are per pair, so they compare across requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

import httpx

from ragline_gateway.clients.base import UpstreamClient, UpstreamError, json_or_none

RerankApi = Literal["rerank", "tei"]

DEFAULT_PATHS: dict[str, str] = {"rerank": "/v1/rerank", "tei": "/rerank"}
# Documents per request when `max_documents` is 0: TEI's default client batch size;
# no split for the rerank shape (reranker-svc takes 256, the gateway sends at most 200).
DEFAULT_MAX_DOCUMENTS: dict[str, int] = {"rerank": 0, "tei": 32}


class RerankerClient(UpstreamClient):
    name = "reranker"

    def __init__(
        self,
        base_url: str,
        pool_size: int,
        *,
        api: RerankApi = "rerank",
        path: str = "",
        model: str = "",
        api_key: str = "",
        max_documents: int = 0,
        health_path: str = "",
        connect_timeout: float = 2.0,
        upstream_http: str = "httptools",
    ) -> None:
        super().__init__(
            base_url, pool_size, connect_timeout=connect_timeout, upstream_http=upstream_http
        )
        if api not in DEFAULT_PATHS:
            raise ValueError(f"unknown reranker API {api!r}; expected one of {list(DEFAULT_PATHS)}")
        self.api = api
        self.path = path or DEFAULT_PATHS[api]
        self.model = model
        self.max_documents = max_documents or DEFAULT_MAX_DOCUMENTS[api]
        # reranker-svc answers /readyz; TEI and vLLM answer /health.
        self.health_path = health_path or ("/health" if api == "tei" else "/readyz")
        if api_key:
            self.http.headers["authorization"] = f"Bearer {api_key}"
        # A reranker with an API key of its own is a server with its own authentication
        # (vLLM, TEI, a hosted API): it never gets ragline's internal service token.
        self.own_auth = bool(api_key)
        # What the reranker scores with (module docstring); None until it answers ready.
        self.scorer: str | None = None
        self._asked_at = -float("inf")

    def send_service_token(self, token: str) -> None:
        super().send_service_token("" if self.own_auth else token)

    def observe_health(self, status: int, payload: Any) -> None:
        if status != 200:
            return  # loading or draining: what it will serve is not known from this
        scorer = payload.get("scorer") if isinstance(payload, dict) else None
        self.scorer = scorer if isinstance(scorer, str) and scorer else "external"

    async def learn_scorer(self, timeout: float, every_s: float = 5.0) -> str | None:
        """`scorer`, asking the health path when it is not known yet (at most once per
        `every_s`: with the health watch on, the watch has usually told it already)."""
        now = time.monotonic()
        if self.scorer is None and not self.known_down and now - self._asked_at >= every_s:
            self._asked_at = now
            try:
                response = await self.http.get(self.health_path, timeout=timeout)
            except httpx.HTTPError:
                return None
            self.observe_health(response.status_code, json_or_none(response))
        return self.scorer

    @classmethod
    def from_settings(cls, settings: Any, pool_size: int) -> RerankerClient:
        return cls(
            settings.reranker_url,
            pool_size,
            api=settings.reranker_api,
            path=settings.reranker_path,
            model=settings.reranker_model,
            api_key=settings.reranker_api_key.get_secret_value(),
            max_documents=settings.reranker_max_documents,
            health_path=settings.reranker_health_path,
            upstream_http=settings.upstream_http,
        )

    async def rerank(
        self, query: str, documents: list[str], top_n: int, timeout: float
    ) -> list[tuple[int, float]]:
        """(index into `documents`, relevance score), best first, at most `top_n`."""
        if not documents or top_n < 1:
            return []
        size = self.max_documents or len(documents)
        parts = await asyncio.gather(
            *(
                self._rerank_part(query, documents[start : start + size], top_n, timeout)
                for start in range(0, len(documents), size)
            )
        )
        ranked = [
            (part_no * size + index, score)
            for part_no, part in enumerate(parts)
            for index, score in part
        ]
        ranked.sort(key=lambda r: r[1], reverse=True)
        return ranked[:top_n]

    async def _rerank_part(
        self, query: str, documents: list[str], top_n: int, timeout: float
    ) -> list[tuple[int, float]]:
        if self.api == "tei":
            body: dict[str, Any] = {"query": query, "texts": documents, "truncate": True}
            payload = await self.call("POST", self.path, timeout, body)
            return self._parse(payload, "score", len(documents))
        body = {"query": query, "documents": documents, "top_n": min(top_n, len(documents))}
        if self.model:
            body["model"] = self.model
        payload = await self.call("POST", self.path, timeout, body)
        results = payload.get("results") if isinstance(payload, dict) else None
        return self._parse(results, "relevance_score", len(documents))

    def _parse(self, results: Any, score_key: str, n: int) -> list[tuple[int, float]]:
        """Check the upstream's list of {index, score}; a bad one is an UpstreamError."""
        if not isinstance(results, list):
            raise UpstreamError(self.name, f"malformed {self.api} response: no result list")
        out: list[tuple[int, float]] = []
        for r in results:
            index = r.get("index") if isinstance(r, dict) else None
            score = r.get(score_key) if isinstance(r, dict) else None
            if (
                not isinstance(index, int) or isinstance(index, bool)
                or not 0 <= index < n
                or not isinstance(score, int | float) or isinstance(score, bool)
                or not math.isfinite(score)
            ):  # fmt: skip
                raise UpstreamError(
                    self.name, f"malformed {self.api} response: bad result {str(r)[:200]}"
                )
            out.append((index, float(score)))
        return out
