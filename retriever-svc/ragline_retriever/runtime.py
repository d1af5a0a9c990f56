"""What the retriever holds for its lifetime: settings, the model, the two indexes, the
write journal and the ingest jobs.

The journal, the jobs and the leases that order writes are local (SQLite in the data
directory; one process) or shared by every replica (Redis, when `write_log_url` is set).

Opened once in the app's lifespan, so `/readyz` turning 200 means the model is loaded and
the stores are open. A backend that cannot be opened at start (a remote store that is
down) does not stop the process: retrieval runs degraded on the other one, as
ARCHITECTURE.md asks, and readiness reports which one is missing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ragline_retriever.backends import make_dense, make_lexical
from ragline_retriever.backends.base import DenseIndex, LexicalIndex
from ragline_retriever.embedding import Embedder
from ragline_retriever.jobs import JobRunner, JobStore
from ragline_retriever.journal import Journal
from ragline_retriever.leases import Leases, LocalLeases, RedisLeases
from ragline_retriever.settings import RetrieverSettings
from ragline_retriever.writes import StoreWriter

log = logging.getLogger("ragline.retriever")


class Runtime:
    def __init__(self, settings: RetrieverSettings) -> None:
        self.settings = settings
        self.embedder = Embedder(
            settings.embedding_model,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch_size,
            cache_size=settings.query_cache_size,
        )
        self.lexical: LexicalIndex = make_lexical(settings)
        self.dense: DenseIndex | None = None
        self.journal, jobs, self.leases = _write_log(settings)
        self.writer = StoreWriter(
            self.journal,
            {"lexical": self.lexical, "dense": None},
            settings.write_timeout_s,
            max_pending=settings.max_pending_writes,
            leases=self.leases,
        )
        self.jobs = JobRunner(jobs, self, leases=self.leases)
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.embedder.load()  # also tells the dense index its dimension
        self.dense = make_dense(self.settings, self.embedder.dim)
        self.writer.stores["dense"] = self.dense
        for role, index in (("lexical", self.lexical), ("dense", self.dense)):
            try:
                await index.open()
            except Exception:
                log.exception(
                    "could not open the %s backend; serving degraded",
                    role,
                    extra={"backend": index.name},
                )
        # Writes journaled before a crash or during an outage are replayed from here on.
        self._tasks = [
            asyncio.create_task(self.writer.repair_forever(self.settings.repair_interval_s)),
            asyncio.create_task(self.jobs.run_forever()),
        ]
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for index in (self.lexical, self.dense):
            if index is None:
                continue
            try:
                await index.close()
            except Exception:
                log.exception("error closing %s", index.name)
        self.embedder.close()
        self.jobs.store.close()
        self.journal.close()
        if getattr(self.journal, "remote", False):
            await self.journal.aclose()
        await self.leases.aclose()

    async def written_elsewhere(self, collection: str) -> bool:
        """Whether another replica may have just written `collection` (shared log only:
        one process knows its own writes)."""
        if getattr(self.journal, "remote", False):
            return bool(await self.journal.written_recently(collection))
        return False

    async def index_version(self, collection: str) -> str:
        """One version per collection, wherever the journal lives (a Redis read when shared)."""
        if getattr(self.journal, "remote", False):
            return await asyncio.to_thread(self.journal.version, collection)
        return self.journal.version(collection)


def _write_log(settings: RetrieverSettings) -> tuple[Any, Any, Leases]:
    """(journal, job store, leases): local SQLite, or shared Redis."""
    if settings.write_log_url:
        from ragline_retriever.redis_jobs import RedisJobStore
        from ragline_retriever.redis_journal import RedisJournal

        url, prefix = settings.write_log_url, settings.write_log_prefix
        return (
            RedisJournal(url, prefix),
            RedisJobStore(url, prefix),
            RedisLeases(url, prefix, ttl_s=settings.lease_ttl_s),
        )
    return (
        Journal(settings.data_dir / "journal.sqlite3"),
        JobStore(settings.data_dir / "jobs.sqlite3"),
        LocalLeases(),
    )
