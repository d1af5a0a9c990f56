"""No lexical index: dense retrieval only (`LEXICAL_BACKEND=none`).

For deployments without Elasticsearch that still want several retriever replicas: the
embedded tantivy index lives in one pod, so replicas cannot share it. Writes are accepted
and dropped (the journal still records them for the dense store), searches are not run at
all (search.py leaves the lexical side out, so it is neither fused nor reported as
degraded), and `verify` compares nothing with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragline_common.wire import Filters
from ragline_retriever.backends.base import Chunk, ScoredChunk


class NoLexicalIndex:
    name = "none"

    async def open(self) -> None:
        pass

    async def healthy(self) -> bool:
        return True

    async def ensure_collection(self, collection: str) -> None:
        pass

    async def has_collection(self, collection: str) -> bool:
        return False

    async def upsert(self, collection: str, chunks: Sequence[Chunk]) -> None:
        pass

    async def delete_document(self, collection: str, doc_id: str) -> int:
        return 0

    async def search(
        self, collection: str, query: str, limit: int, filters: Filters | None = None
    ) -> list[ScoredChunk]:
        return []

    async def list_collections(self) -> dict[str, int]:
        return {}

    async def chunk_ids(self, collection: str) -> set[str]:
        return set()

    async def close(self) -> None:
        pass
