"""The two stores converge: writes go through the journal, a store that fails between the
two writes gets them replayed in order, and `verify` reports any difference.

The stores are the real embedded ones (tantivy and Milvus Lite on tmp_path). A failure is
injected by a switch in front of one store, standing in for an outage between the two
writes; everything behind the switch is the real index. Every scenario runs on both
journals: SQLite (one process) and Redis (shared by replicas; a real redis-server).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ragline_cli.processes import free_port, redis_server
from ragline_retriever.backends.base import BackendUnavailable, Chunk, MetadataConflict
from ragline_retriever.backends.milvus_index import MilvusIndex
from ragline_retriever.backends.tantivy_index import TantivyIndex
from ragline_retriever.journal import Journal, WriteOp
from ragline_retriever.redis_journal import RedisJournal
from ragline_retriever.writes import JournalFull, StoreWriter

DIM = 4
COLLECTION = "kb"
OUTAGE = BackendUnavailable("injected outage")


class Switched:
    """A real index behind a switch: `down` makes writes fail with that exception, as an
    outage would; chunks whose text contains `refuse` are refused for good, as
    Elasticsearch refuses a mapping conflict (the rest of the batch is written, then the
    refused documents are named)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down: Exception | None = None
        self.refuse = ""
        # Awaited before refusing: lets a test order the refusal after the other store.
        self.before_refusal: Callable[[], Awaitable[None]] | None = None
        # Awaited once the real index has applied an upsert (it is visible to searches).
        self.after_upsert: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self) -> None:
        if self.down is not None:
            raise self.down

    async def ensure_collection(self, collection: str) -> None:
        self._check()
        await self.inner.ensure_collection(collection)

    async def upsert(self, collection: str, chunks: list[Chunk], *vectors: Any) -> None:
        self._check()
        refused = sorted({c.doc_id for c in chunks if self.refuse and self.refuse in c.text})
        if refused and self.before_refusal is not None:
            await self.before_refusal()
        keep = [i for i, c in enumerate(chunks) if c.doc_id not in refused]
        rest = [[v[i] for i in keep] for v in vectors]
        await self.inner.upsert(collection, [chunks[i] for i in keep], *rest)
        if self.after_upsert is not None:
            await self.after_upsert()
        if refused:
            raise MetadataConflict(collection, "year", "injected refusal", refused)

    async def delete_document(self, collection: str, doc_id: str) -> int:
        self._check()
        return await self.inner.delete_document(collection, doc_id)


def doc(doc_id: str, *texts: str) -> WriteOp:
    chunks = [Chunk(f"{doc_id}#{i}", doc_id, text, i, title=doc_id) for i, text in enumerate(texts)]
    return WriteOp(chunks=chunks, vectors=[[1.0, float(i), 0.0, 0.0] for i in range(len(texts))])


WriteLog = Callable[[Path], Any]


def sqlite_log(base: Path) -> Journal:
    return Journal(base / "journal.sqlite3")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def write_log(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WriteLog]:
    """Opens a test's journal: SQLite under its base, or Redis under a prefix of its own
    (the same base reopens the same journal, as a restarted replica would)."""
    if request.param == "sqlite":
        yield sqlite_log
        return
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    try:
        server.wait_ready(30)
        yield lambda base: RedisJournal(
            f"redis://127.0.0.1:{port}/0", prefix=f"t{abs(hash(str(base)))}:"
        )
    finally:
        server.stop()


class Stores:
    def __init__(self, base: Path, write_log: WriteLog = sqlite_log) -> None:
        self.base = base
        self.lexical = Switched(TantivyIndex(base / "tantivy"))
        self.dense = Switched(MilvusIndex(str(base / "milvus.db"), dim=DIM))
        self.journal = write_log(base)
        self.writer = StoreWriter(
            self.journal, {"lexical": self.lexical, "dense": self.dense}, timeout_s=30
        )

    async def open(self) -> None:
        await self.lexical.open()
        await self.dense.open()

    async def close(self) -> None:
        await self.lexical.close()
        await self.dense.close()
        self.journal.close()

    async def ids(self) -> tuple[set[str], set[str]]:
        return (
            await self.lexical.chunk_ids(COLLECTION),
            await self.dense.chunk_ids(COLLECTION),
        )

    async def dense_texts(self, doc_id: str) -> list[str]:
        hits = await self.dense.search(COLLECTION, [1.0, 0.0, 0.0, 0.0], 50, {"doc_id": doc_id})
        return sorted(h.chunk.text for h in hits)

    async def lexical_texts(self, query: str, doc_id: str) -> list[str]:
        hits = await self.lexical.search(COLLECTION, query, 50, {"doc_id": doc_id})
        return sorted(h.chunk.text for h in hits)


def run(
    base: Path, scenario: Callable[[Stores], Awaitable[None]], write_log: WriteLog = sqlite_log
) -> None:
    async def main() -> None:
        stores = Stores(base, write_log)
        await stores.open()
        try:
            await scenario(stores)
        finally:
            await stores.close()

    asyncio.run(main())


async def wait_until_drained(writer: StoreWriter, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if writer.journal.count() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the repair loop did not drain the journal")


def test_a_write_that_fails_in_one_store_is_replayed_by_the_repair_loop(
    tmp_path: Path, write_log: WriteLog
) -> None:
    async def scenario(s: Stores) -> None:
        await s.writer.write(COLLECTION, doc("seed", "seed text"))
        s.dense.down = OUTAGE
        result = await s.writer.write(COLLECTION, doc("alpha", "alpha one", "alpha two"))
        assert set(result.pending) == {"dense"} and "injected outage" in result.pending["dense"]
        lexical, dense = await s.ids()
        assert lexical == {"seed#0", "alpha#0", "alpha#1"} and dense == {"seed#0"}
        assert s.journal.count(COLLECTION) == 1

        s.dense.down = None
        repairs = asyncio.create_task(s.writer.repair_forever(interval_s=0.05))
        try:
            await wait_until_drained(s.writer)
        finally:
            repairs.cancel()
        lexical, dense = await s.ids()
        assert lexical == dense == {"seed#0", "alpha#0", "alpha#1"}
        assert await s.dense_texts("alpha") == ["alpha one", "alpha two"]

    run(tmp_path, scenario, write_log)


def test_replays_keep_the_order_of_writes(tmp_path: Path, write_log: WriteLog) -> None:
    """While dense is down, a document is written long, then short, and another one is
    deleted; a replay in any other order would leave stale chunks or a deleted document."""

    async def scenario(s: Stores) -> None:
        await s.writer.write(COLLECTION, doc("gone", "to be deleted"))
        s.dense.down = OUTAGE
        await s.writer.write(COLLECTION, doc("beta", "beta old one", "beta old two", "beta old 3"))
        await s.writer.write(COLLECTION, doc("beta", "beta new"))
        pending = await s.writer.write(COLLECTION, WriteOp(delete_doc_ids=["gone"]))
        assert "waiting behind" in pending.pending["dense"]  # not applied out of order
        s.dense.down = None
        # A new write while older ones are journaled: dense applies them first, in order.
        result = await s.writer.write(COLLECTION, doc("gamma", "gamma"))
        assert result.pending == {}
        assert s.journal.count() == 0
        lexical, dense = await s.ids()
        assert lexical == dense == {"beta#0", "gamma#0"}
        assert await s.dense_texts("beta") == ["beta new"]
        assert await s.lexical_texts("beta", "beta") == ["beta new"]

    run(tmp_path, scenario, write_log)


def test_the_journal_survives_a_restart(tmp_path: Path, write_log: WriteLog) -> None:
    async def crash_mid_write(s: Stores) -> None:
        s.lexical.down = OUTAGE
        result = await s.writer.write(COLLECTION, doc("delta", "delta text"))
        assert set(result.pending) == {"lexical"}

    async def restart(s: Stores) -> None:
        assert s.journal.count() == 1
        assert await s.writer.repair_once(force=True) == 0
        lexical, dense = await s.ids()
        assert lexical == dense == {"delta#0"}

    run(tmp_path, crash_mid_write, write_log)
    run(tmp_path, restart, write_log)


@pytest.mark.parametrize("dense_first", [False, True], ids=["refusal-first", "dense-first"])
def test_a_refused_document_ends_in_neither_store_and_blocks_nothing(
    tmp_path: Path, write_log: WriteLog, dense_first: bool
) -> None:
    """Run both ways round: when dense has already recorded the write, the refusal is
    what takes it off the journal, and the undo must be journaled all the same."""

    async def scenario(s: Stores) -> None:
        await s.writer.write(COLLECTION, doc("epsilon", "epsilon v1"))
        s.lexical.refuse = "BAD"

        async def after_dense() -> None:
            deadline = time.monotonic() + 30
            while not all(e.done["dense"] for e in s.journal.pending(COLLECTION)):
                assert time.monotonic() < deadline, "dense never recorded the write"
                await asyncio.sleep(0.01)

        if dense_first:
            s.lexical.before_refusal = after_dense
        both = doc("epsilon", "epsilon BAD v2", "epsilon v2b")
        theta = doc("theta", "theta")
        both.chunks += theta.chunks
        both.vectors += theta.vectors
        result = await s.writer.write(COLLECTION, both)
        assert "injected refusal" in result.rejected and "'year'" in result.rejected
        assert s.journal.count() == 0  # refused, not retried forever
        assert await s.writer.outcome(result.seq) == (False, result.rejected)
        lexical, dense = await s.ids()
        # The refused document is gone from both; the rest of the write landed in both.
        assert lexical == dense == {"theta#0"}
        assert (await s.writer.write(COLLECTION, doc("zeta", "zeta"))).pending == {}
        lexical, dense = await s.ids()
        assert lexical == dense == {"theta#0", "zeta#0"}

    run(tmp_path, scenario, write_log)


def test_a_fix_sent_during_an_outage_survives_the_refusal_of_the_bad_version(
    tmp_path: Path,
    write_log: WriteLog,
) -> None:
    """While lexical is down, a bad version and then its fix are journaled; when lexical
    comes back it refuses the bad one, and the undo must not delete the fix."""

    async def scenario(s: Stores) -> None:
        s.lexical.down = OUTAGE
        s.lexical.refuse = "BAD"
        bad = await s.writer.write(COLLECTION, doc("iota", "iota BAD version"))
        fixed = await s.writer.write(COLLECTION, doc("iota", "iota fixed version"))
        assert set(bad.pending) == set(fixed.pending) == {"lexical"}
        s.lexical.down = None
        assert await s.writer.repair_once(force=True) == 0
        assert (await s.writer.outcome(bad.seq))[1]  # the bad version was refused
        assert await s.writer.outcome(fixed.seq) == (False, None)
        lexical, dense = await s.ids()
        assert lexical == dense == {"iota#0"}
        assert await s.dense_texts("iota") == ["iota fixed version"]
        assert await s.lexical_texts("iota", "iota") == ["iota fixed version"]

    run(tmp_path, scenario, write_log)


def test_only_a_refusal_is_final_any_other_error_is_retried(
    tmp_path: Path, write_log: WriteLog
) -> None:
    """tantivy reports a full disk or a held lock as ValueError: that is an outage to wait
    out, not a verdict on the documents."""

    async def scenario(s: Stores) -> None:
        s.lexical.down = ValueError("Failed to acquire Lockfile: LockBusy")
        result = await s.writer.write(COLLECTION, doc("kappa", "kappa"))
        assert result.rejected == "" and "LockBusy" in result.pending["lexical"]
        s.lexical.down = None
        assert await s.writer.repair_once(force=True) == 0
        lexical, dense = await s.ids()
        assert lexical == dense == {"kappa#0"}

    run(tmp_path, scenario, write_log)


def test_the_journal_is_bounded_while_a_store_is_down(tmp_path: Path, write_log: WriteLog) -> None:
    async def scenario(s: Stores) -> None:
        s.writer.max_pending = 2
        s.dense.down = OUTAGE
        for name in ("lambda", "mu"):
            assert (await s.writer.write(COLLECTION, doc(name, name))).pending
        with pytest.raises(JournalFull):
            await s.writer.write(COLLECTION, doc("nu", "nu"))
        assert s.journal.count() == 2  # the refused write was not journaled
        s.dense.down = None
        assert await s.writer.repair_once(force=True) == 0
        lexical, dense = await s.ids()
        assert lexical == dense == {"lambda#0", "mu#0"}

    run(tmp_path, scenario, write_log)


def test_both_stores_down_journals_the_write_for_both(tmp_path: Path, write_log: WriteLog) -> None:
    async def scenario(s: Stores) -> None:
        s.lexical.down = s.dense.down = OUTAGE
        result = await s.writer.write(COLLECTION, doc("eta", "eta"))
        assert set(result.pending) == {"lexical", "dense"}
        s.lexical.down = s.dense.down = None
        assert await s.writer.repair_once(force=True) == 0
        lexical, dense = await s.ids()
        assert lexical == dense == {"eta#0"}

    run(tmp_path, scenario, write_log)


def counter(journal: Journal, collection: str = COLLECTION) -> int:
    """The counter of `collection`'s index version, after checking the version's form."""
    epoch, _, count = journal.version(collection).rpartition("-")
    assert epoch == journal.epoch and len(epoch) == 16 and int(epoch, 16) >= 0
    return int(count)


def test_every_store_that_applies_a_write_bumps_the_version(
    tmp_path: Path, write_log: WriteLog
) -> None:
    async def scenario(s: Stores) -> None:
        assert counter(s.journal) == 0  # never written: counter 0, epoch all the same
        await s.writer.write(COLLECTION, doc("alpha", "alpha text"))
        assert counter(s.journal) == 2  # once per store
        # Searching changes nothing.
        assert await s.dense_texts("alpha") == ["alpha text"]
        assert await s.lexical_texts("alpha", "alpha") == ["alpha text"]
        assert counter(s.journal) == 2
        result = await s.writer.write(COLLECTION, WriteOp(delete_doc_ids=["alpha"]))
        assert result.removed == {"lexical": 1, "dense": 1}
        assert counter(s.journal) == 4
        # A delete that finds nothing is still a write each store applied.
        await s.writer.write(COLLECTION, WriteOp(delete_doc_ids=["alpha"]))
        assert counter(s.journal) == 6
        # Collections are independent.
        assert counter(s.journal, "other") == 0
        await s.writer.write("other", doc("beta", "beta text"))
        assert counter(s.journal, "other") == 2 and counter(s.journal) == 6

    run(tmp_path, scenario, write_log)


def test_a_write_pending_on_one_store_bumps_again_when_the_repair_loop_applies_it(
    tmp_path: Path,
    write_log: WriteLog,
) -> None:
    """While dense is down, lexical applies the write: one bump, and only after the write
    is visible in lexical. The repair loop's replay on dense bumps again, so an answer
    cached while only lexical had the write is not served once dense has it too."""

    async def scenario(s: Stores) -> None:
        seen: list[tuple[int, list[str]]] = []

        async def visible() -> None:  # inside lexical's upsert, once tantivy has committed
            seen.append((counter(s.journal), await s.lexical_texts("alpha", "alpha")))

        s.lexical.after_upsert = visible
        s.dense.down = OUTAGE
        result = await s.writer.write(COLLECTION, doc("alpha", "alpha text"))
        assert set(result.pending) == {"dense"}
        # Visible in lexical before the version moved; moved once that store recorded it.
        assert seen == [(0, ["alpha text"])]
        assert counter(s.journal) == 1
        # A failed retry of the store that is down bumps nothing.
        assert await s.writer.repair_once(force=True) == 1
        assert counter(s.journal) == 1
        s.dense.down = None
        repairs = asyncio.create_task(s.writer.repair_forever(interval_s=0.05))
        try:
            await wait_until_drained(s.writer)
        finally:
            repairs.cancel()
        assert counter(s.journal) == 2
        assert await s.dense_texts("alpha") == ["alpha text"]

    run(tmp_path, scenario, write_log)


def test_a_refused_write_bumps_the_version(tmp_path: Path, write_log: WriteLog) -> None:
    """The refusing store may have written the rest of the batch, and the undo then
    changes both stores again: each of those bumps."""

    async def scenario(s: Stores) -> None:
        await s.writer.write(COLLECTION, doc("theta", "theta"))
        assert counter(s.journal) == 2
        s.lexical.refuse = "BAD"
        result = await s.writer.write(COLLECTION, doc("epsilon", "epsilon BAD"))
        assert result.rejected
        # dense applied it, lexical refused it, then each store applied the undo.
        assert counter(s.journal) == 6
        # A write that waited behind an outage and is refused on replay bumps too.
        s.lexical.down = OUTAGE
        bad = await s.writer.write(COLLECTION, doc("iota", "iota BAD"))
        assert set(bad.pending) == {"lexical"} and counter(s.journal) == 7  # dense only
        s.lexical.down = None
        assert await s.writer.repair_once(force=True) == 0
        assert (await s.writer.outcome(bad.seq))[1]
        # lexical's refusal, then the undo in both stores.
        assert counter(s.journal) == 10

    run(tmp_path, scenario, write_log)


def test_the_version_survives_a_restart_and_a_new_journal_has_a_new_epoch(
    tmp_path: Path,
) -> None:
    before: list[str] = []

    async def write(s: Stores) -> None:
        await s.writer.write(COLLECTION, doc("kappa", "kappa"))
        s.dense.down = OUTAGE  # a write still owed by dense when the process stops
        await s.writer.write(COLLECTION, doc("lambda", "lambda"))
        assert counter(s.journal) == 3
        before.append(s.journal.version(COLLECTION))

    async def restart(s: Stores) -> None:
        assert s.journal.version(COLLECTION) == before[0]
        assert await s.writer.repair_once(force=True) == 0
        assert counter(s.journal) == 4
        before.append(s.journal.version(COLLECTION))

    run(tmp_path, write)
    run(tmp_path, restart)
    reopened = Journal(tmp_path / "journal.sqlite3")
    try:
        assert reopened.version(COLLECTION) == before[1]
    finally:
        reopened.close()
    # A wiped data directory: a new epoch, so no old version string can come back.
    fresh = Journal(tmp_path / "wiped" / "journal.sqlite3")
    try:
        assert fresh.epoch != before[0].rpartition("-")[0]
        assert fresh.version(COLLECTION) == f"{fresh.epoch}-0"
    finally:
        fresh.close()


def test_a_version_is_published_only_when_its_transaction_commits(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        seq = journal.append(COLLECTION, doc("mu", "mu"))
        with pytest.raises(ValueError):
            journal.mark_done(seq, "nowhere", COLLECTION)  # rolled back: no bump
        assert counter(journal) == 0
        journal.mark_done(seq, "lexical")  # the collection read from the journal
        assert counter(journal) == 1
        journal.mark_done(seq, "dense", COLLECTION)
        assert counter(journal) == 2 and journal.count() == 0
        assert counter(journal, "other") == 0
    finally:
        journal.close()


@pytest.mark.slow
def test_verify_reports_chunks_missing_from_one_store(tmp_path: Path) -> None:
    """Through the service's own runtime and `verify`: damage made behind the service's
    back (a chunk deleted from Milvus directly) is found, and an ingest repairs it."""
    from ragline_common.wire import DocumentIn
    from ragline_retriever.ingest import ingest
    from ragline_retriever.runtime import Runtime
    from ragline_retriever.settings import RetrieverSettings
    from ragline_retriever.verify import verify

    async def main() -> None:
        rt = Runtime(RetrieverSettings(data_dir=tmp_path / "data"))
        await rt.open()
        try:
            docs = [
                DocumentIn(id="one", text="The first document is about rivers."),
                DocumentIn(id="two", text="The second document is about mountains."),
            ]
            await ingest(rt, COLLECTION, docs)
            report = await verify(rt, COLLECTION)
            assert report.consistent and report.lexical_chunks == report.dense_chunks == 2
            assert rt.dense is not None
            await rt.dense.delete_document(COLLECTION, "two")
            report = await verify(rt, COLLECTION)
            assert not report.consistent
            assert report.only_in_lexical == ["two#0"] and report.only_in_dense == []
            assert report.only_in_lexical_count == 1 and report.pending_writes == 0
            await ingest(rt, COLLECTION, docs[1:])
            assert (await verify(rt, COLLECTION)).consistent
        finally:
            await rt.close()

    asyncio.run(main())
