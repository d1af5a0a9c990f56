"""The `ragline_*` metrics of retriever-svc: what a user of retrieval feels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SEARCH_SECONDS = Histogram(
    "ragline_retriever_search_duration_seconds",
    "Duration of one backend search (dense includes query embedding), by backend role.",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
)
DEGRADED = Counter(
    "ragline_retriever_degraded_total",
    "Retrievals answered without one backend, by the backend that was missing.",
    ["backend"],
)
INGESTED_CHUNKS = Counter(
    "ragline_retriever_ingested_chunks_total",
    "Chunks written to both indexes.",
)
EMBEDDING_SECONDS = Histogram(
    "ragline_retriever_embedding_duration_seconds",
    "Time to embed a query or a batch of passages.",
    ["kind"],
    buckets=(*_LATENCY_BUCKETS, 30.0, 60.0, 120.0),
)
PENDING_WRITES = Gauge(
    "ragline_retriever_pending_writes",
    "Journaled writes that some store has not applied yet (0 when the stores agree).",
)
WRITE_FAILURES = Counter(
    "ragline_retriever_write_failures_total",
    "Store writes that failed and stay journaled for a retry, by store.",
    ["store"],
)
WRITES_REPLAYED = Counter(
    "ragline_retriever_writes_replayed_total",
    "Journaled writes applied on a later attempt, by store.",
    ["store"],
)
JOBS = Counter(
    "ragline_retriever_ingest_jobs_total",
    "Ingest jobs that finished, by final status.",
    ["status"],
)

# Known label values exported at 0 from the start, so that rate() sees the first increment.
for _role in ("lexical", "dense"):
    DEGRADED.labels(_role)
    WRITE_FAILURES.labels(_role)
    WRITES_REPLAYED.labels(_role)
