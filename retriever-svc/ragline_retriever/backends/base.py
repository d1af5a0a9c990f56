"""The two index roles, as small protocols every backend implements the same way.

Semantics shared by all backends (the contract suite checks them):
- `upsert(collection, chunks)` makes the given chunks the *whole* set of chunks of each
  document they belong to: chunks of those documents not in the batch are removed, so a
  shorter new version leaves no orphans. Creating the collection is the caller's job
  (`ensure_collection`).
- `search` on a collection that does not exist raises `CollectionNotFound`.
- `delete_document` returns how many chunks it removed (0 for an unknown document).
- Filters: `{field: value}` is equality, `{field: [v, ...]}` is membership; a field is
  `doc_id`, `source`, `title` or a metadata key. A document without the key never matches.
- Every method is safe to call from the event loop: blocking work runs in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ragline_common.wire import Filters, MetadataValue

# Filter fields that are document attributes rather than metadata keys.
TOP_LEVEL_FILTER_FIELDS = frozenset({"doc_id", "source", "title"})


class CollectionNotFound(LookupError):
    """The named collection does not exist in this backend."""


class BackendUnavailable(RuntimeError):
    """The backend could not be reached or refused the operation."""


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    text: str
    position: int
    title: str = ""
    url: str = ""
    source: str = ""
    metadata: dict[str, MetadataValue] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "text": self.text,
            "position": self.position,
            "title": self.title,
            "url": self.url,
            "source": self.source,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Chunk:
        return cls(
            chunk_id=str(data["chunk_id"]),
            doc_id=str(data["doc_id"]),
            text=str(data.get("text", "")),
            position=int(data.get("position", 0)),
            title=str(data.get("title") or ""),
            url=str(data.get("url") or ""),
            source=str(data.get("source") or ""),
            metadata=dict(data.get("metadata") or {}),
        )


@dataclass(frozen=True)
class ScoredChunk:
    chunk: Chunk
    # The backend's own score (BM25, cosine similarity); comparable only within one list.
    score: float


def filter_items(filters: Filters | None) -> list[tuple[str, list[MetadataValue]]]:
    """Normalise filters to (field, allowed values); equality is membership of one."""
    items = []
    for name, value in (filters or {}).items():
        values = list(value) if isinstance(value, list) else [value]
        items.append((name, values))
    return items


@runtime_checkable
class LexicalIndex(Protocol):
    name: str

    async def open(self) -> None: ...
    async def healthy(self) -> bool: ...
    async def ensure_collection(self, collection: str) -> None: ...
    async def has_collection(self, collection: str) -> bool: ...
    async def upsert(self, collection: str, chunks: Sequence[Chunk]) -> None: ...
    async def delete_document(self, collection: str, doc_id: str) -> int: ...
    async def search(
        self, collection: str, query: str, limit: int, filters: Filters | None = None
    ) -> list[ScoredChunk]: ...
    async def list_collections(self) -> dict[str, int]: ...
    async def close(self) -> None: ...


@runtime_checkable
class DenseIndex(Protocol):
    name: str

    async def open(self) -> None: ...
    async def healthy(self) -> bool: ...
    async def ensure_collection(self, collection: str) -> None: ...
    async def has_collection(self, collection: str) -> bool: ...
    async def upsert(
        self, collection: str, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]
    ) -> None: ...
    async def delete_document(self, collection: str, doc_id: str) -> int: ...
    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int,
        filters: Filters | None = None,
    ) -> list[ScoredChunk]: ...
    async def list_collections(self) -> dict[str, int]: ...
    async def close(self) -> None: ...
