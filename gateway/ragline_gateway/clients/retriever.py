"""retriever-svc client: hybrid retrieval and the document management the gateway forwards."""

from __future__ import annotations

import httpx

from ragline_common.middleware import request_headers
from ragline_common.wire import Filters, RetrieveResponse
from ragline_gateway.clients.base import UpstreamClient, UpstreamError


class RetrieverClient(UpstreamClient):
    name = "retriever"

    async def retrieve(
        self, query: str, collection: str, top_k: int, filters: Filters, timeout: float
    ) -> RetrieveResponse:
        body = {"query": query, "collection": collection, "top_k": top_k, "filters": filters}
        return RetrieveResponse.model_validate(
            await self.call("POST", "/v1/retrieve", timeout, body)
        )

    async def index_version(self, collection: str, timeout: float) -> str:
        """Changes whenever a write to the collection becomes searchable (the cache key)."""
        payload = await self.call("GET", f"/v1/collections/{collection}/version", timeout)
        return str(payload["version"])

    async def forward(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        content: bytes,
        content_type: str | None,
        timeout: float,
    ) -> httpx.Response:
        """One document-management request passed through as it came: the retriever owns
        those bodies and their errors, so the gateway neither re-validates nor rewraps them."""
        self.check_reachable()
        headers = request_headers()
        if content_type:
            headers["content-type"] = content_type
        try:
            return await self.http.request(
                method, path, params=params, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise UpstreamError(self.name, f"timed out after {timeout}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(self.name, f"unreachable ({type(exc).__name__})") from exc
