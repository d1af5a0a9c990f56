"""Dense index: Milvus through pymilvus `MilvusClient` (Milvus Lite on a file by default).

Milvus Lite is one process per data directory and its client is not meant for concurrent
use, so every call goes through one single-thread executor: calls are serialized and the
event loop never blocks. Rows are flushed after each write (unflushed rows are scanned in
Python, ~15x slower to search) and collections are loaded on open, as a reopened Lite file
needs. Filter values are written into the expression as JSON literals, because Milvus Lite
rejects expression templates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from ragline_common.wire import Filters, MetadataValue
from ragline_retriever.backends.base import (
    TOP_LEVEL_FILTER_FIELDS,
    BackendUnavailable,
    Chunk,
    CollectionNotFound,
    ScoredChunk,
    filter_items,
)

log = logging.getLogger("ragline.retriever.milvus")
T = TypeVar("T")

_OUTPUT_FIELDS = ["chunk_id", "doc_id", "text", "position", "title", "url", "source", "metadata"]
# VARCHAR limits in bytes; the chunker bounds chunk text well below the text limit.
_MAX_LEN = {
    "chunk_id": 512,
    "doc_id": 512,
    "text": 65535,
    "title": 4096,
    "url": 8192,
    "source": 4096,
}


def _literal(value: MetadataValue) -> str:
    """A Milvus expression literal; JSON string escaping is what its parser accepts."""
    return json.dumps(value)


def filter_expression(filters: Filters | None) -> str | None:
    """The boolean expression for the filters; None when some filter can match nothing."""
    clauses = []
    for name, values in filter_items(filters):
        if name in TOP_LEVEL_FILTER_FIELDS:
            strings = [v for v in values if isinstance(v, str)]
            if not strings:
                return None
            clauses.append(f"{name} in [{', '.join(_literal(v) for v in strings)}]")
        else:
            # `in` does not take a JSON path on the left in Milvus Lite: spell out the ORs.
            ref = f"metadata[{_literal(name)}]"
            clauses.append("(" + " or ".join(f"{ref} == {_literal(v)}" for v in values) + ")")
    return " and ".join(clauses)


class MilvusIndex:
    name = "milvus"

    def __init__(
        self, uri: str, dim: int, token: str = "", prefix: str = "ragline_", timeout: float = 30
    ) -> None:
        self.uri = uri
        self.dim = dim
        self.token = token
        self.prefix = prefix
        self.timeout = timeout
        self._client: MilvusClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus")
        self._loaded: set[str] = set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @property
    def client(self) -> MilvusClient:
        """The open client; a server that was down at start is reconnected on next use.

        Only read from the executor thread, so the lazy open cannot race.
        """
        if self._client is None:
            try:
                self._open()
            except Exception as exc:
                raise BackendUnavailable(f"milvus is unreachable: {exc}") from exc
        assert self._client is not None
        return self._client

    def _physical(self, collection: str) -> str:
        return f"{self.prefix}{collection}"

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": self.timeout}
        if self.token:
            kwargs["token"] = self.token
        client = MilvusClient(**kwargs)
        self._loaded.clear()
        for physical in client.list_collections():
            if physical.startswith(self.prefix):
                client.load_collection(physical)
                self._loaded.add(physical)
        self._client = client

    def _load(self, physical: str) -> None:
        if physical not in self._loaded:
            self.client.load_collection(physical)
            self._loaded.add(physical)

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self._run(lambda: self.client.list_collections()), timeout=2)
        except Exception:
            return False
        return True

    async def ensure_collection(self, collection: str) -> None:
        await self._run(self._ensure, self._physical(collection))

    def _ensure(self, physical: str) -> None:
        if self.client.has_collection(physical):
            self._load(physical)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(
            "chunk_id", DataType.VARCHAR, is_primary=True, max_length=_MAX_LEN["chunk_id"]
        )
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        for name in ("doc_id", "text", "title", "url", "source"):
            schema.add_field(name, DataType.VARCHAR, max_length=_MAX_LEN[name])
        schema.add_field("position", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        index = self.client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type="HNSW",
            metric_type="COSINE",
            params={"M": 16, "efConstruction": 200},
        )
        index.add_index(field_name="doc_id", index_type="INVERTED")
        self.client.create_collection(physical, schema=schema, index_params=index)
        self._load(physical)

    def _require(self, collection: str) -> str:
        physical = self._physical(collection)
        if physical not in self._loaded:
            if not self.client.has_collection(physical):
                raise CollectionNotFound(collection)
            self._load(physical)
        return physical

    async def has_collection(self, collection: str) -> bool:
        try:
            await self._run(self._require, collection)
        except CollectionNotFound:
            return False
        return True

    async def upsert(
        self, collection: str, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]
    ) -> None:
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        await self._run(self._upsert, collection, list(chunks), [list(v) for v in vectors])

    def _upsert(self, collection: str, chunks: list[Chunk], vectors: list[list[float]]) -> None:
        physical = self._require(collection)
        rows = [{**c.payload(), "vector": v} for c, v in zip(chunks, vectors, strict=True)]
        if rows:
            self.client.upsert(physical, rows)
        doc_ids = list(dict.fromkeys(c.doc_id for c in chunks))
        if doc_ids:
            # Stale chunks of these documents (an older, longer version) go after the new
            # rows are in, so a reader never finds the document missing.
            keep = ", ".join(_literal(c.chunk_id) for c in chunks)
            docs = ", ".join(_literal(d) for d in doc_ids)
            self.client.delete(physical, filter=f"doc_id in [{docs}] and chunk_id not in [{keep}]")
        self.client.flush(physical)

    async def delete_document(self, collection: str, doc_id: str) -> int:
        return await self._run(self._delete, collection, doc_id)

    def _count(self, physical: str, expression: str) -> int:
        rows = self.client.query(physical, filter=expression, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _delete(self, collection: str, doc_id: str) -> int:
        physical = self._require(collection)
        expression = f"doc_id == {_literal(doc_id)}"
        found = self._count(physical, expression)
        if found:
            self.client.delete(physical, filter=expression)
            self.client.flush(physical)
        return found

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int,
        filters: Filters | None = None,
    ) -> list[ScoredChunk]:
        return await self._run(self._search, collection, list(vector), limit, filters)

    def _search(
        self, collection: str, vector: list[float], limit: int, filters: Filters | None
    ) -> list[ScoredChunk]:
        physical = self._require(collection)
        expression = filter_expression(filters)
        if expression is None:
            return []
        try:
            result = self.client.search(
                physical,
                data=[vector],
                filter=expression,
                limit=limit,
                output_fields=_OUTPUT_FIELDS,
                search_params={"metric_type": "COSINE", "params": {"ef": max(64, limit)}},
            )
        except MilvusException as exc:
            raise BackendUnavailable(str(exc)) from exc
        return [
            ScoredChunk(Chunk.from_payload(hit["entity"]), float(hit["distance"]))
            for hit in result[0]
        ]

    async def list_collections(self) -> dict[str, int]:
        return await self._run(self._list)

    def _list(self) -> dict[str, int]:
        found = {}
        for physical in sorted(self.client.list_collections()):
            if physical.startswith(self.prefix):
                self._load(physical)
                found[physical[len(self.prefix) :]] = self._count(physical, "")
        return found

    async def close(self) -> None:
        if self._client is not None:
            await self._run(self._client.close)
            self._client = None
        self._executor.shutdown(wait=False)
