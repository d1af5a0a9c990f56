"""Production lexical index: Elasticsearch (BM25) through `AsyncElasticsearch`.

One index per collection, `<prefix><collection>`, created on first use with an English
analyzer on `text` and `title` and keyword fields for everything filters read. Writes use
`refresh=wait_for`/`refresh=True` so that a read after an ingest or delete sees it, which
is what the contract suite (and the gateway) expect. Richer analyzers and index templates
belong to a later change (`_mapping` is the seam).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from elasticsearch import AsyncElasticsearch, NotFoundError
from elasticsearch.helpers import async_bulk

from ragline_common.wire import Filters
from ragline_retriever.backends.base import (
    TOP_LEVEL_FILTER_FIELDS,
    Chunk,
    CollectionNotFound,
    ScoredChunk,
    filter_items,
)

log = logging.getLogger("ragline.retriever.elasticsearch")

_FILTER_FIELD = {"doc_id": "doc_id", "source": "source", "title": "title.raw"}


def _mapping() -> dict[str, Any]:
    return {
        "dynamic_templates": [
            {
                "metadata_strings": {
                    "path_match": "metadata.*",
                    "match_mapping_type": "string",
                    "mapping": {"type": "keyword"},
                }
            }
        ],
        "properties": {
            "chunk_id": {"type": "keyword"},
            "doc_id": {"type": "keyword"},
            "text": {"type": "text", "analyzer": "english"},
            "title": {
                "type": "text",
                "analyzer": "english",
                "fields": {"raw": {"type": "keyword", "ignore_above": 1024}},
            },
            "url": {"type": "keyword", "index": False},
            "source": {"type": "keyword"},
            "position": {"type": "integer"},
            "metadata": {"type": "object", "dynamic": True},
        },
    }


class ElasticsearchIndex:
    name = "elasticsearch"

    def __init__(
        self, url: str, api_key: str = "", prefix: str = "ragline-", timeout: float = 10.0
    ) -> None:
        self.prefix = prefix
        self._client = AsyncElasticsearch(
            url,
            api_key=api_key or None,
            request_timeout=timeout,
            max_retries=1,
            retry_on_timeout=False,
        )
        self._known: set[str] = set()

    def _index(self, collection: str) -> str:
        return f"{self.prefix}{collection}"

    async def open(self) -> None:
        """Nothing to open: the client connects lazily, so an ES outage does not block start."""

    async def healthy(self) -> bool:
        try:
            return bool(await self._client.ping(request_timeout=1.0))
        except Exception:
            return False

    async def ensure_collection(self, collection: str) -> None:
        index = self._index(collection)
        if index in self._known:
            return
        if not await self._client.indices.exists(index=index):
            try:
                await self._client.indices.create(
                    index=index,
                    mappings=_mapping(),
                    settings={"number_of_shards": 1},
                )
            except Exception as exc:
                # Two replicas may race to create it; losing that race is fine.
                if "resource_already_exists_exception" not in str(exc):
                    raise
        self._known.add(index)

    async def has_collection(self, collection: str) -> bool:
        index = self._index(collection)
        if index in self._known:
            return True
        if await self._client.indices.exists(index=index):
            self._known.add(index)
            return True
        return False

    async def upsert(self, collection: str, chunks: Sequence[Chunk]) -> None:
        if not await self.has_collection(collection):
            raise CollectionNotFound(collection)
        index = self._index(collection)
        actions = [
            {"_op_type": "index", "_index": index, "_id": c.chunk_id, "_source": c.payload()}
            for c in chunks
        ]
        if actions:
            await async_bulk(self._client, actions, refresh="wait_for", raise_on_error=True)
        doc_ids = list(dict.fromkeys(c.doc_id for c in chunks))
        if doc_ids:
            await self._client.delete_by_query(
                index=index,
                query={
                    "bool": {
                        "filter": [{"terms": {"doc_id": doc_ids}}],
                        "must_not": [{"ids": {"values": [c.chunk_id for c in chunks]}}],
                    }
                },
                refresh=True,
                conflicts="proceed",
            )

    async def delete_document(self, collection: str, doc_id: str) -> int:
        if not await self.has_collection(collection):
            raise CollectionNotFound(collection)
        result = await self._client.delete_by_query(
            index=self._index(collection),
            query={"term": {"doc_id": doc_id}},
            refresh=True,
            conflicts="proceed",
        )
        return int(result.get("deleted", 0))

    @staticmethod
    def _filters(filters: Filters | None) -> list[dict[str, Any]] | None:
        clauses: list[dict[str, Any]] = []
        for name, values in filter_items(filters):
            if name in TOP_LEVEL_FILTER_FIELDS:
                strings = [v for v in values if isinstance(v, str)]
                if not strings:
                    return None
                clauses.append({"terms": {_FILTER_FIELD[name]: strings}})
            else:
                clauses.append({"terms": {f"metadata.{name}": values}})
        return clauses

    async def search(
        self, collection: str, query: str, limit: int, filters: Filters | None = None
    ) -> list[ScoredChunk]:
        clauses = self._filters(filters)
        if clauses is None:
            return []
        try:
            response = await self._client.search(
                index=self._index(collection),
                query={
                    "bool": {
                        "must": [{"multi_match": {"query": query, "fields": ["text", "title"]}}],
                        "filter": clauses,
                    }
                },
                size=limit,
                track_total_hits=False,
            )
        except NotFoundError as exc:
            raise CollectionNotFound(collection) from exc
        return [
            ScoredChunk(Chunk.from_payload(hit["_source"]), float(hit["_score"] or 0.0))
            for hit in response["hits"]["hits"]
        ]

    async def list_collections(self) -> dict[str, int]:
        try:
            indices = await self._client.indices.get(index=f"{self.prefix}*")
        except NotFoundError:
            return {}
        found = {}
        for index in sorted(indices):
            count = await self._client.count(index=index)
            found[index[len(self.prefix) :]] = int(count["count"])
        return found

    async def close(self) -> None:
        await self._client.close()
