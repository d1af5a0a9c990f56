"""retriever-svc client: hybrid retrieval and the document management the gateway forwards."""

from __future__ import annotations

from ragline_common.wire import Filters, RetrieveResponse
from ragline_gateway.clients.base import UpstreamClient


class RetrieverClient(UpstreamClient):
    name = "retriever"

    async def retrieve(
        self, query: str, collection: str, top_k: int, filters: Filters, timeout: float
    ) -> RetrieveResponse:
        body = {"query": query, "collection": collection, "top_k": top_k, "filters": filters}
        return RetrieveResponse.model_validate(
            await self.call("POST", "/v1/retrieve", timeout, body)
        )
