"""Asynchronous ingest jobs: accept a large batch at once, ingest it in the background,
let the caller poll its progress.

Jobs and their documents are kept in SQLite in the data directory (or in Redis, shared by
every replica: redis_jobs.py), so a restart resumes unfinished jobs where they stopped
(ingestion is idempotent, so redoing the batch that was in flight is harmless). One runner
per process works through jobs in order, each under its lease (leases.py: with several
replicas, one runs it and another takes it over if that one dies), in batches of
`job_batch_documents`, each through the same `ingest()` as a synchronous request. A batch
that hits an unavailable store is retried with a growing pause for up to
`job_retry_window_s`; a batch a store refuses (bad input) fails the job with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis

from ragline_common.errors import ApiError
from ragline_common.wire import DocumentIn
from ragline_retriever.leases import Lease, LeaseBusy, Leases, LocalLeases
from ragline_retriever.metrics import JOBS
from ragline_retriever.protocol import Job, JobStatus

if TYPE_CHECKING:
    from ragline_retriever.runtime import Runtime

log = logging.getLogger("ragline.retriever.jobs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    status TEXT NOT NULL,
    documents INTEGER NOT NULL,
    documents_done INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    payload BLOB            -- the documents (JSON); dropped once the job ends
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
"""
_COLUMNS = (
    "job_id, collection, status, documents, documents_done, chunks, error,"
    " created_at, started_at, finished_at"
)
FINISHED: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
# Finished jobs kept for polling; older ones are pruned as new ones arrive.
_KEEP_FINISHED = 1000


def _job(row: tuple) -> Job:
    job_id, collection, status, total, done, chunks, error, created, started, finished = row
    return Job(
        job_id=job_id,
        collection=collection,
        status=status,
        documents=total,
        documents_done=done,
        chunks=chunks,
        progress=round(done / total, 4) if total else 1.0,
        error=error,
        created_at=created,
        started_at=started,
        finished_at=finished,
    )


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        with self._lock:
            # A job that was running when the process stopped resumes from its last batch.
            self._db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")

    def create(self, collection: str, documents: list[DocumentIn]) -> Job:
        job_id = uuid.uuid4().hex
        payload = orjson.dumps([d.model_dump(mode="json") for d in documents])
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, collection, status, documents, created_at, payload)"
                " VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, collection, len(documents), time.time(), payload),
            )
            self._db.execute(
                "DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')"
                " AND job_id NOT IN (SELECT job_id FROM jobs WHERE status IN"
                " ('succeeded', 'failed', 'cancelled') ORDER BY created_at DESC LIMIT ?)",
                (_KEEP_FINISHED,),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return _job(row) if row else None

    def list(self, collection: str | None, limit: int) -> list[Job]:
        where, args = ("WHERE collection = ?", [collection]) if collection else ("", [])
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def open_jobs(self, limit: int = 100) -> list[Job]:
        """Queued or running jobs, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('queued', 'running')"
                " ORDER BY created_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [_job(r) for r in rows]

    def documents(self, job_id: str) -> list[DocumentIn]:
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return [DocumentIn.model_validate(d) for d in orjson.loads(row[0] or b"[]")] if row else []

    def start(self, job_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?)"
                " WHERE job_id = ? AND status = 'queued'",
                (time.time(), job_id),
            )

    def progress(self, job_id: str, documents_done: int, chunks: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET documents_done = ?, chunks = ? WHERE job_id = ?",
                (documents_done, chunks, job_id),
            )

    def finish(self, job_id: str, status: JobStatus, error: str | None = None) -> bool:
        """Ends a job that has not ended yet; False when it already had (e.g. cancelled)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, payload = NULL"
                " WHERE job_id = ? AND status IN ('queued', 'running')",
                (status, error, time.time(), job_id),
            )
        return cursor.rowcount > 0

    def status(self, job_id: str) -> JobStatus | None:
        job = self.get(job_id)
        return job.status if job else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


# How often a runner looks for jobs another replica accepted (or left behind when it died).
_POLL_S = 1.0


class JobRunner:
    def __init__(self, store: JobStore | Any, rt: Runtime, leases: Leases | None = None) -> None:
        self.store = store
        self.rt = rt
        self.leases: Leases = leases or LocalLeases()
        self._wake = asyncio.Event()

    async def submit(self, collection: str, documents: list[DocumentIn]) -> Job:
        job = await asyncio.to_thread(self.store.create, collection, documents)
        self._wake.set()
        return job

    async def cancel(self, job_id: str) -> Job | None:
        """Cancels a queued or running job; a running one stops after its current batch."""
        await asyncio.to_thread(self.store.finish, job_id, "cancelled")
        return await asyncio.to_thread(self.store.get, job_id)

    async def run_forever(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a submit in between is not missed
            ran = False
            try:
                jobs = await asyncio.to_thread(self.store.open_jobs)
            except Exception:  # the shared job store (Redis) is down: look again later
                log.exception("could not list ingest jobs")
                jobs = []
            for job in jobs:
                try:
                    async with self.leases.hold(f"job:{job.job_id}", wait_s=0) as lease:
                        ran = True
                        await self._run(job, lease)
                except LeaseBusy:
                    continue  # another replica runs it
                except (OSError, redis.RedisError):
                    log.exception("could not claim an ingest job", extra={"job_id": job.job_id})
                    break
                except asyncio.CancelledError:
                    raise  # shutdown: the job stays "running" and resumes at the next start
                except Exception as exc:
                    log.exception("ingest job crashed", extra={"job_id": job.job_id})
                    await self._finish(job, "failed", f"internal error: {type(exc).__name__}")
                break  # look again from the oldest: jobs run in order
            if not ran:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _POLL_S)

    async def _finish(self, job: Job, status: JobStatus, error: str | None = None) -> None:
        if await asyncio.to_thread(self.store.finish, job.job_id, status, error):
            JOBS.labels(status).inc()
            log.info(
                "ingest job finished",
                extra={"job_id": job.job_id, "status": status, "error": error or ""},
            )

    async def _run(self, job: Job, lease: Lease) -> None:
        # Read again under the lease: another replica may have advanced it meanwhile.
        await asyncio.to_thread(self.store.start, job.job_id)
        job = await asyncio.to_thread(self.store.get, job.job_id) or job
        documents = await asyncio.to_thread(self.store.documents, job.job_id)
        done, chunks = job.documents_done, job.chunks
        while done < len(documents):
            if await asyncio.to_thread(self.store.status, job.job_id) != "running":
                return  # cancelled, or finished by another replica
            if lease.lost:
                return  # another replica has taken the job over
            batch = documents[done : done + self.rt.settings.job_batch_documents]
            try:
                written = await self._write(job, batch)
            except ApiError as exc:
                await self._finish(job, "failed", f"documents {done + 1}+: {exc.message}")
                return
            done += len(batch)
            chunks += written
            await asyncio.to_thread(self.store.progress, job.job_id, done, chunks)
        await self._finish(job, "succeeded")

    async def _write(self, job: Job, batch: list[DocumentIn]) -> int:
        """Writes one batch, waiting out an unavailable store for up to the retry window;
        returns its chunk count. A write one store still owes is already journaled, so
        waiting means letting the journal drain, not re-embedding the batch."""
        from ragline_retriever.ingest import write_documents  # ingest imports the runtime

        deadline = time.monotonic() + self.rt.settings.job_retry_window_s
        pause = 1.0
        written = None
        while True:
            try:
                if written is None:
                    written = await write_documents(self.rt, job.collection, batch)
                    if not written.write.pending:
                        return written.response.chunks
                else:
                    # Ours is journaled: wait for it (not for the whole collection); when
                    # another replica holds the collection, it applies ours too.
                    with contextlib.suppress(LeaseBusy):
                        await self.rt.writer.drain(job.collection)
                    pending, refused = await self.rt.writer.outcome(written.write.seq)
                    if refused:
                        raise ApiError(422, "document_rejected", refused)
                    if not pending:
                        return written.response.chunks
                message = "an index is unavailable"
            except ApiError as exc:
                if exc.status < 500:
                    raise
                message = exc.message
            if time.monotonic() + pause > deadline:
                raise ApiError(503, "index_unavailable", f"gave up after retrying: {message}")
            if await asyncio.to_thread(self.store.status, job.job_id) != "running":
                raise ApiError(409, "cancelled", "the job was cancelled")
            log.warning(
                "ingest job waiting for an index",
                extra={"job_id": job.job_id, "error": message, "pause_s": pause},
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)
