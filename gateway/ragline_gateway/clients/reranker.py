"""reranker-svc client in the widely used rerank shape, so any compatible server can stand in."""

from __future__ import annotations

from ragline_gateway.clients.base import UpstreamClient


class RerankerClient(UpstreamClient):
    name = "reranker"

    async def rerank(
        self, query: str, documents: list[str], top_n: int, timeout: float
    ) -> list[tuple[int, float]]:
        """(index into `documents`, relevance score), best first."""
        body = {"query": query, "documents": documents, "top_n": top_n}
        payload = await self.call("POST", "/v1/rerank", timeout, body)
        results = sorted(payload["results"], key=lambda r: r["relevance_score"], reverse=True)
        return [(int(r["index"]), float(r["relevance_score"])) for r in results[:top_n]]
