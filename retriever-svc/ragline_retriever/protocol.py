"""Wire models of the retriever's own endpoints (jobs, verify, version): the gateway forwards these
as they are, so they live here rather than in the shared contracts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ragline_common.wire import DocumentIn, StrictModel

MAX_DOCUMENTS_PER_JOB = 10_000
# Ids listed per side in a verify report; the counts are always complete.
MAX_LISTED_IDS = 1000

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class IngestJobRequest(StrictModel):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS_PER_JOB)


class Job(BaseModel):
    job_id: str
    collection: str
    status: JobStatus
    documents: int
    documents_done: int = 0
    chunks: int = 0
    # documents_done / documents, for a progress bar.
    progress: float = 0.0
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobsResponse(BaseModel):
    jobs: list[Job]


class VerifyReport(BaseModel):
    collection: str
    # True when both stores hold exactly the same chunk ids and no write is pending.
    consistent: bool
    lexical_chunks: int
    dense_chunks: int
    # Chunk ids held by one store and missing from the other (at most MAX_LISTED_IDS each).
    only_in_lexical: list[str]
    only_in_dense: list[str]
    only_in_lexical_count: int
    only_in_dense_count: int
    # Journaled writes not yet applied everywhere: a difference they explain will heal.
    pending_writes: int


class CollectionVersion(BaseModel):
    collection: str
    # "<epoch hex>-<counter>": changes after every write a store applies to the collection
    # (counter 0 for a collection never written); never repeats for other data. Compare it
    # for equality only.
    version: str
