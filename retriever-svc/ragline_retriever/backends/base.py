"""The two index roles, as small protocols every backend implements the same way.

Semantics shared by all backends (the contract suite checks them):
- `upsert(collection, chunks)` makes the given chunks the *whole* set of chunks of each
  document they belong to: chunks of those documents not in the batch are removed, so a
  shorter new version leaves no orphans. Creating the collection is the caller's job
  (`ensure_collection`).
- `search` on a collection that does not exist raises `CollectionNotFound`.
- `delete_document` returns how many chunks it removed (0 for an unknown document).
- `chunk_ids` returns every chunk id stored in a collection (for `verify`, which compares
  stores), fast enough for 100k chunks.
- `similarities(collection, vector, chunk_ids)` (dense only) returns the cosine
  similarity of `vector` and each given chunk's stored vector, by chunk id, without a
  search: how the retriever scores the hits only the lexical search found. Chunks it
  does not hold are left out.
- Filters follow `ragline_common.wire` (equality, membership, numeric and date ranges,
  typed comparisons); `filter_clauses` turns them into the two shapes backends translate.
  A document without the key never matches.
- Typed comparisons read hidden per-chunk maps that every backend stores beside the
  metadata (`hidden_fields`): `metadata_numbers` (int/float values as doubles),
  `metadata_dates` (ISO-8601 string values as epoch seconds) and `metadata_booleans`.
  Engines disagree on how a JSON value's type is compared (Milvus treats true as 1,
  Elasticsearch compares a keyword range as strings and coerces "true" into a boolean
  field); maps that each hold one kind of value make them agree. The maps are never part
  of a returned `Chunk`.
- Every method is safe to call from the event loop: blocking work runs in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import TypeAdapter

from ragline_common.wire import (
    DOCUMENT_FILTER_FIELDS,
    Filters,
    MetadataValue,
    Range,
    finite_number,
    iso_instant,
)

# Filter fields that are document attributes rather than metadata keys.
TOP_LEVEL_FILTER_FIELDS = DOCUMENT_FILTER_FIELDS
# The hidden per-chunk maps that typed comparisons read (see the module docstring).
NUMBERS_FIELD = "metadata_numbers"
DATES_FIELD = "metadata_dates"
BOOLEANS_FIELD = "metadata_booleans"
HIDDEN_FIELDS = (NUMBERS_FIELD, DATES_FIELD, BOOLEANS_FIELD)
_FILTERS: TypeAdapter[Filters] = TypeAdapter(Filters)


class CollectionNotFound(LookupError):
    """The named collection does not exist in this backend."""


class BackendUnavailable(RuntimeError):
    """The backend could not be reached or refused the operation."""


class WriteRefused(ValueError):
    """A store refused the data for good (not an outage): retrying cannot succeed.

    The journal treats only this as final; any other error is an outage and is retried.
    """

    def __init__(self, message: str, doc_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        # The documents of the write that were refused (empty: the whole write).
        self.doc_ids = list(doc_ids)


class MetadataConflict(WriteRefused):
    """A metadata value has another type than the store already indexes for its key.

    Elasticsearch fixes one type per metadata key per index (the first value seen decides:
    number, string or boolean), so `year: "2020"` after `year: 2020` is rejected. That is
    the client's data, not an outage: the service answers 422 and must not retry.
    """

    def __init__(
        self, collection: str, key: str | None, reason: str, doc_ids: Sequence[str] = ()
    ) -> None:
        self.collection = collection
        self.key = key
        self.reason = reason
        what = f"metadata key {key!r}" if key else "metadata"
        super().__init__(
            f"{what} of collection {collection!r} has another type than the one already "
            f"indexed for it: {reason}",
            doc_ids,
        )


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


def hidden_fields(metadata: dict[str, MetadataValue]) -> dict[str, dict[str, Any]]:
    """The hidden maps stored with a chunk: its numbers, its ISO-8601 date strings (as
    epoch seconds; a string is a date only in the form `iso_instant` accepts) and its
    booleans, each map holding one kind of value only."""
    numbers: dict[str, float] = {}
    dates: dict[str, float] = {}
    booleans: dict[str, bool] = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            booleans[key] = value
        elif isinstance(value, str):
            instant = iso_instant(value)
            if instant is not None:
                dates[key] = instant
        elif (number := finite_number(value)) is not None:
            numbers[key] = number
    return {NUMBERS_FIELD: numbers, DATES_FIELD: dates, BOOLEANS_FIELD: booleans}


@dataclass(frozen=True)
class AnyOf:
    """Equality or membership: the field holds one of these values, compared by type.

    Numbers and booleans are matched against their hidden maps (so 1 == 1.0, and 1 never
    equals true), strings against the metadata itself. For `doc_id`, `source` and `title`
    only the strings can match.
    """

    field: str
    strings: tuple[str, ...] = ()
    numbers: tuple[float, ...] = ()
    booleans: tuple[bool, ...] = ()

    @property
    def on_document(self) -> bool:
        return self.field in TOP_LEVEL_FILTER_FIELDS


@dataclass(frozen=True)
class Between:
    """A range on a metadata key, read from the hidden map of its kind."""

    field: str
    hidden_field: str  # NUMBERS_FIELD or DATES_FIELD
    lower: float | None = None
    include_lower: bool = True
    upper: float | None = None
    include_upper: bool = True


def filter_clauses(filters: Filters | None) -> list[AnyOf | Between]:
    """The filters as clauses that must all hold; each backend translates the two shapes.

    Filters are validated again (a no-op for a parsed request), so an in-process caller
    passing a plain `{"year": {"gte": 2020}}` gets the same checks as an HTTP client.
    """
    clauses: list[AnyOf | Between] = []
    for name, value in _FILTERS.validate_python(filters or {}).items():
        if isinstance(value, dict):
            bounds = Range.model_validate(value)
            lower, upper = bounds.lower(), bounds.upper()
            clauses.append(
                Between(
                    name,
                    DATES_FIELD if bounds.kind == "date" else NUMBERS_FIELD,
                    lower=lower[0] if lower else None,
                    include_lower=lower[1] if lower else True,
                    upper=upper[0] if upper else None,
                    include_upper=upper[1] if upper else True,
                )
            )
            continue
        values = value if isinstance(value, list) else [value]
        numbers = (
            finite_number(v)
            for v in values
            if isinstance(v, int | float) and not isinstance(v, bool)
        )
        clauses.append(
            AnyOf(
                name,
                strings=tuple(dict.fromkeys(v for v in values if isinstance(v, str))),
                numbers=tuple(dict.fromkeys(n for n in numbers if n is not None)),
                booleans=tuple(dict.fromkeys(v for v in values if isinstance(v, bool))),
            )
        )
    return clauses


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
    async def chunk_ids(self, collection: str) -> set[str]: ...
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
    async def similarities(
        self, collection: str, vector: Sequence[float], chunk_ids: Sequence[str]
    ) -> dict[str, float]: ...
    async def list_collections(self) -> dict[str, int]: ...
    async def chunk_ids(self, collection: str) -> set[str]: ...
    # Another replica just wrote `collection`: make the next reads see that write.
    def written_elsewhere(self, collection: str) -> None: ...
    async def close(self) -> None: ...
