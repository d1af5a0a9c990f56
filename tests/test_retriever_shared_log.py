"""Two writers sharing one write log in Redis, as two retriever replicas do: writes that
either accepts are applied once, in the order they were accepted, by whichever holds the
collection's lease; a write left behind by a replica that died holding the lease is
applied by the other once the lease expires; both read one index version.

Real redis-server, real embedded stores (tantivy and Milvus Lite, shared by the two
writers as two replicas share Elasticsearch and a Milvus server). The process-level
version, with SIGKILL, is tests/test_retriever_replicas.py; the last test here kills
Redis under a real retriever process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ragline_cli.processes import free_port, redis_server
from ragline_retriever.backends.base import Chunk
from ragline_retriever.backends.milvus_index import MilvusIndex
from ragline_retriever.backends.tantivy_index import TantivyIndex
from ragline_retriever.journal import WriteOp
from ragline_retriever.leases import LeaseBusy, RedisLeases
from ragline_retriever.redis_journal import RedisJournal
from ragline_retriever.writes import StoreWriter

from service_helpers import assert_error, running_service

DIM = 4
COLLECTION = "kb"
LEASE_TTL_S = 1.5


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    try:
        server.wait_ready(30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


def doc(doc_id: str, text: str) -> WriteOp:
    return WriteOp(chunks=[Chunk(f"{doc_id}#0", doc_id, text, 0)], vectors=[[1.0, 0.0, 0.0, 0.0]])


class Replicas:
    """Two writers over one journal prefix and one pair of stores."""

    def __init__(self, base: Path, url: str) -> None:
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"
        self.lexical = TantivyIndex(base / "tantivy")
        self.dense = MilvusIndex(str(base / "milvus.db"), dim=DIM)
        self.writers = [self._writer() for _ in range(2)]

    def _writer(self) -> StoreWriter:
        return StoreWriter(
            RedisJournal(self.url, self.prefix),
            {"lexical": self.lexical, "dense": self.dense},
            timeout_s=30,
            leases=RedisLeases(self.url, self.prefix, ttl_s=LEASE_TTL_S),
        )

    async def __aenter__(self) -> Replicas:
        await self.lexical.open()
        await self.dense.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.journal.close()
            await writer.leases.aclose()
        await self.lexical.close()
        await self.dense.close()

    async def texts(self, doc_id: str) -> tuple[list[str], list[str]]:
        lexical = await self.lexical.search(COLLECTION, "version", 10, {"doc_id": doc_id})
        dense = await self.dense.search(COLLECTION, [1.0, 0, 0, 0], 10, {"doc_id": doc_id})
        return [h.chunk.text for h in lexical], [h.chunk.text for h in dense]


def test_writes_from_two_replicas_land_in_the_order_they_were_accepted(
    tmp_path: Path, redis_url: str
) -> None:
    """Twenty versions of one document, sent through both replicas at once: each store
    ends on the version with the highest sequence number, and nothing stays journaled."""

    async def main() -> None:
        async with Replicas(tmp_path, redis_url) as r:
            await r.writers[0].write(COLLECTION, doc("seed", "seed version"))
            results = await asyncio.gather(
                *(
                    r.writers[i % 2].write(COLLECTION, doc("contested", f"version {i}"))
                    for i in range(20)
                )
            )
            assert all(not result.pending for result in results)
            last = max(results, key=lambda result: result.seq)
            winner = f"version {results.index(last)}"
            assert await r.texts("contested") == ([winner], [winner])
            assert r.writers[0].journal.count() == 0
            # One version, whichever replica is asked: 2 stores x 21 writes applied.
            versions = {w.journal.version(COLLECTION) for w in r.writers}
            assert len(versions) == 1 and versions.pop().endswith("-42")

    asyncio.run(main())


def test_a_write_left_by_a_replica_that_died_is_applied_once_its_lease_expires(
    tmp_path: Path, redis_url: str
) -> None:
    """Replica 0 journals a write and dies holding the collection's lease (its lease is
    left in Redis, unrenewed). Replica 1's repair loop leaves the collection alone while
    the lease lives, then applies the write; the version moves on for both."""

    async def main() -> None:
        async with Replicas(tmp_path, redis_url) as r:
            dead, alive = r.writers
            before = alive.journal.version(COLLECTION)
            dead.journal.append(COLLECTION, doc("orphan", "version left behind"))
            client = redis.Redis.from_url(redis_url)
            client.set(f"{r.prefix}lease:{COLLECTION}", "dead-replica", px=int(LEASE_TTL_S * 1000))
            client.close()
            died = time.monotonic()

            assert await alive.repair_once(force=True) == 1  # the lease is still held
            with pytest.raises(LeaseBusy):
                await alive.drain(COLLECTION, wait_s=0)
            deadline = died + 10 * LEASE_TTL_S
            while await alive.repair_once(force=True):
                assert time.monotonic() < deadline, "the write was never applied"
                await asyncio.sleep(0.05)
            took = time.monotonic() - died
            assert took >= LEASE_TTL_S * 0.9  # not before the dead replica's lease expired
            assert await r.texts("orphan") == (["version left behind"], ["version left behind"])
            assert dead.journal.version(COLLECTION) == alive.journal.version(COLLECTION) != before

    asyncio.run(main())


def test_a_lease_is_renewed_while_held_and_released_after(redis_url: str) -> None:
    async def main() -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        one = RedisLeases(redis_url, prefix, ttl_s=1.0)
        two = RedisLeases(redis_url, prefix, ttl_s=1.0)
        try:
            async with one.hold("c", wait_s=0) as lease:
                held_until = time.monotonic() + 2.5  # well past one time to live
                while time.monotonic() < held_until:
                    with pytest.raises(LeaseBusy):
                        async with two.hold("c", wait_s=0):
                            pass
                    await asyncio.sleep(0.2)
                assert not lease.lost
            async with two.hold("c", wait_s=0) as lease:  # released at once
                assert not lease.lost
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(main())


@pytest.mark.slow
def test_with_the_write_log_down_writes_are_503_and_searches_go_on(tmp_path: Path) -> None:
    """A real retriever process on the Redis write log: Redis is SIGKILLed, and the
    callers get what ARCHITECTURE.md promises (writes, jobs and versions a clear 503 to
    retry; retrieval unaffected); a Redis back on the same port takes writes again."""
    port = free_port()
    redis_proc = redis_server(port, tmp_path / "redis").start()
    env = {
        "RAGLINE_RETRIEVER_DATA_DIR": str(tmp_path / "data"),
        "RAGLINE_RETRIEVER_WRITE_LOG_URL": f"redis://127.0.0.1:{port}/0",
    }
    docs = {"documents": [{"id": "tide", "text": "The tide tables are printed every May."}]}
    try:
        redis_proc.wait_ready(30)
        with running_service("retriever-log", "ragline_retriever", env, tmp_path / "logs") as svc:
            documents = f"{svc.url}/v1/collections/{COLLECTION}/documents"
            assert httpx.post(documents, json=docs, timeout=60).status_code == 200
            assert redis_proc.pid is not None
            os.kill(redis_proc.pid, signal.SIGKILL)
            redis_proc.stop()  # reaps it

            for response in (
                httpx.post(documents, json=docs, timeout=60),
                httpx.post(f"{svc.url}/v1/collections/{COLLECTION}/jobs", json=docs, timeout=60),
                httpx.get(f"{svc.url}/v1/collections/{COLLECTION}/version", timeout=60),
            ):
                assert_error(response, 503, "write_log_unavailable")
                assert response.headers["retry-after"] == "5"
            found = httpx.post(
                f"{svc.url}/v1/retrieve",
                json={"query": "tide tables", "collection": COLLECTION, "top_k": 3},
                timeout=60,
            )
            assert found.status_code == 200 and found.json()["degraded"] == []
            assert [hit["doc_id"] for hit in found.json()["hits"]] == ["tide"]

            redis_proc = redis_server(port, tmp_path / "redis-again").start()
            redis_proc.wait_ready(30)
            assert httpx.post(documents, json=docs, timeout=60).status_code == 200
    finally:
        redis_proc.stop()
