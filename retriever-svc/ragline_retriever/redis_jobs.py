"""Ingest jobs in Redis, so that a job accepted by one retriever replica is run by any.

jobs.JobStore's methods, over the Redis of the shared journal (redis_journal.py). Which
replica runs a job is decided by a lease per job (leases.py): the runner of every replica
walks the open jobs oldest first and runs the first whose lease it gets. A replica that
dies mid-job stops renewing, and another replica resumes the job at its last finished
batch once the lease has expired (ingestion is idempotent, so redoing the batch that was
in flight is harmless).

Keys, under `prefix`: `job:<id>` (hash; the documents in `payload` until the job ends),
`jobs` and `jobs:<collection>` (zsets by creation time, for listing), `jobs:open` (queued
or running, by creation time) and `jobs:finished` (by end time, to keep the last 1000).
"""

from __future__ import annotations

import time
import uuid

import orjson
import redis

from ragline_common.wire import DocumentIn
from ragline_retriever.protocol import Job, JobStatus
from ragline_retriever.redis_journal import AofWaiter

_KEEP_FINISHED = 1000
_FIELDS = (
    "collection", "status", "documents", "documents_done", "chunks", "error",
    "created_at", "started_at", "finished_at",
)  # fmt: skip

# ARGV: status, error, finished_at. Ends a job that has not ended; returns 1, else 0.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'error', ARGV[2], 'finished_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""
_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return 1
"""


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _number(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


class RedisJobStore:
    remote = True

    def __init__(self, url: str, prefix: str = "ragline:retriever:") -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.prefix = prefix
        self._finish = self._redis.register_script(_FINISH)
        self._start = self._redis.register_script(_START)
        self._aof = AofWaiter(self._redis)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def create(self, collection: str, documents: list[DocumentIn]) -> Job:
        job_id = uuid.uuid4().hex
        now = time.time()
        payload = orjson.dumps([d.model_dump(mode="json") for d in documents])
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            self._key(f"job:{job_id}"),
            mapping={
                "collection": collection,
                "status": "queued",
                "documents": len(documents),
                "documents_done": 0,
                "chunks": 0,
                "error": "",
                "created_at": now,
                "started_at": "",
                "finished_at": "",
                "payload": payload,
            },
        )
        for index in ("jobs", f"jobs:{collection}", "jobs:open"):
            pipe.zadd(self._key(index), {job_id: now})
        pipe.execute()
        self._aof.wait()  # a 202 means the job survives a Redis restart
        self._prune()
        job = self.get(job_id)
        assert job is not None
        return job

    def _prune(self) -> None:
        finished = self._key("jobs:finished")
        extra = int(self._redis.zcard(finished)) - _KEEP_FINISHED
        if extra <= 0:
            return
        for raw in self._redis.zrange(finished, 0, extra - 1):
            job_id = raw.decode()
            collection = self._redis.hget(self._key(f"job:{job_id}"), "collection")
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key(f"job:{job_id}"))
            pipe.zrem(self._key("jobs"), job_id)
            if collection is not None:
                pipe.zrem(self._key(f"jobs:{collection.decode()}"), job_id)
            pipe.zrem(finished, job_id)
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        row = self._redis.hmget(self._key(f"job:{job_id}"), list(_FIELDS))
        if row[0] is None:
            return None
        collection, status, total, done, chunks, error, created, started, finished = row
        total_n, done_n = int(total or 0), int(done or 0)
        return Job(
            job_id=job_id,
            collection=collection.decode(),
            status=status.decode(),  # type: ignore[arg-type]
            documents=total_n,
            documents_done=done_n,
            chunks=int(chunks or 0),
            progress=round(done_n / total_n, 4) if total_n else 1.0,
            error=_text(error) or None,
            created_at=float(created or 0),
            started_at=_number(started),
            finished_at=_number(finished),
        )

    def list(self, collection: str | None, limit: int) -> list[Job]:
        index = self._key(f"jobs:{collection}" if collection else "jobs")
        ids = [raw.decode() for raw in self._redis.zrevrange(index, 0, limit - 1)]
        return [job for job in map(self.get, ids) if job is not None]

    def open_jobs(self, limit: int = 100) -> list[Job]:
        """Queued or running jobs (a running one may have lost its runner), oldest first."""
        ids = [raw.decode() for raw in self._redis.zrange(self._key("jobs:open"), 0, limit - 1)]
        return [job for job in map(self.get, ids) if job is not None]

    def documents(self, job_id: str) -> list[DocumentIn]:
        payload = self._redis.hget(self._key(f"job:{job_id}"), "payload")
        return [DocumentIn.model_validate(d) for d in orjson.loads(payload or b"[]")]

    def start(self, job_id: str) -> None:
        self._start(keys=[self._key(f"job:{job_id}")], args=[time.time()])

    def progress(self, job_id: str, documents_done: int, chunks: int) -> None:
        self._redis.hset(
            self._key(f"job:{job_id}"),
            mapping={"documents_done": documents_done, "chunks": chunks},
        )

    def finish(self, job_id: str, status: JobStatus, error: str | None = None) -> bool:
        ended = self._finish(
            keys=[self._key(f"job:{job_id}"), self._key("jobs:open"), self._key("jobs:finished")],
            args=[status, error or "", time.time(), job_id],
        )
        return bool(ended)

    def status(self, job_id: str) -> JobStatus | None:
        raw = self._redis.hget(self._key(f"job:{job_id}"), "status")
        return raw.decode() if raw is not None else None  # type: ignore[return-value]

    def close(self) -> None:
        self._redis.close()
