"""Pydantic models of the internal wire contracts (ARCHITECTURE.md, "Wire contracts").

Both sides of each call import these, so a contract change is one edit that the type
checker follows. Bounds live here too: every input is bounded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

COLLECTION_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}$"

CollectionName = Annotated[str, StringConstraints(pattern=COLLECTION_PATTERN)]
MetadataValue = str | int | float | bool
# Filters: `{field: value}` means equality, `{field: [v1, v2]}` means membership.
# A field is `doc_id`, `source`, `title` or a key of the document's metadata.
FilterValue = MetadataValue | list[MetadataValue]
Filters = dict[
    Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], FilterValue
]

MAX_QUERY_CHARS = 4000
MAX_DOCUMENT_CHARS = 2_000_000
MAX_DOCUMENTS_PER_BATCH = 256
MAX_RETRIEVE_TOP_K = 200
MAX_RERANK_DOCUMENTS = 256
MAX_RERANK_DOCUMENT_CHARS = 20_000


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


# --- retriever-svc ---------------------------------------------------------------------


class DocumentIn(StrictModel):
    id: Annotated[str, StringConstraints(pattern=DOC_ID_PATTERN)]
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DOCUMENT_CHARS)]
    title: Annotated[str, StringConstraints(max_length=1000)] = ""
    url: Annotated[str, StringConstraints(max_length=2000)] = ""
    source: Annotated[str, StringConstraints(max_length=1000)] = ""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=64)


class IngestRequest(StrictModel):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS_PER_BATCH)


class IngestResponse(BaseModel):
    collection: str
    documents: int
    chunks: int
    timings: dict[str, float] = Field(default_factory=dict)


class DeleteResponse(BaseModel):
    collection: str
    doc_id: str
    deleted: bool


class CollectionInfo(BaseModel):
    name: str
    chunks: int


class CollectionsResponse(BaseModel):
    collections: list[CollectionInfo]


class RetrieveRequest(StrictModel):
    query: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)
    ]
    collection: CollectionName = "default"
    top_k: int = Field(default=50, ge=1, le=MAX_RETRIEVE_TOP_K)
    filters: Filters = Field(default_factory=dict, max_length=16)


class Hit(BaseModel):
    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    url: str = ""
    source: str = ""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    score: float
    # 1-based rank in each backend's list; None where that backend did not return it.
    ranks: dict[Literal["lexical", "dense"], int | None] = Field(default_factory=dict)


class RetrieveResponse(BaseModel):
    hits: list[Hit]
    degraded: list[Literal["lexical", "dense"]] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


# --- reranker-svc (the widely used rerank shape) ----------------------------------------


class RerankRequest(StrictModel):
    model: str | None = None
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
    documents: list[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_RERANK_DOCUMENT_CHARS)]
    ] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1, le=MAX_RERANK_DOCUMENTS)
    return_documents: bool = False


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult]


# --- llm-svc (OpenAI Chat Completions subset) ------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, StringConstraints(max_length=200_000)]
