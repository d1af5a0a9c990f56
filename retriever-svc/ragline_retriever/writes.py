"""Writes to the two stores through the journal, so that they converge.

Each write is journaled first, then every journaled write of the collection that a store
has not applied yet is applied to that store, oldest first. A store that fails stops its
own chain there (later writes wait behind the failed one, so a replay can never put an
old version over a newer one); the other store goes on. The repair loop re-runs the
chains of every collection that still has journaled writes, with a growing pause while a
store stays down, until both stores have applied everything.

A store that refuses a write for good (`WriteRefused`, such as an Elasticsearch mapping
conflict; every other error counts as an outage) would block its chain forever if
retried. Such a write is marked done for that store and, in the same transaction, a
delete of the refused documents is journaled, so the two stores agree again (those
documents are absent from both) and the caller is told to fix and resend them. A later
journaled write of the same document is left alone: it is the fix.

Every store's application of a write (and every refusal) bumps the collection's index
version in the journal, after the write is visible there (see journal.py).

With several replicas sharing one journal (redis_journal.py), a collection's writes are
applied by whichever replica holds its lease (leases.py); a replica that accepted a write
while another holds the lease waits for it, and the holder applies that write too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ragline_retriever.backends.base import CollectionNotFound, WriteRefused
from ragline_retriever.journal import STORES, Entry, Journal, WriteOp
from ragline_retriever.leases import Lease, LeaseBusy, Leases, LocalLeases
from ragline_retriever.metrics import PENDING_WRITES, WRITE_FAILURES, WRITES_REPLAYED

log = logging.getLogger("ragline.retriever.writes")

_MAX_BACKOFF_S = 60.0


@dataclass
class WriteResult:
    seq: int
    # Stores that still owe this write, with the last error of each.
    pending: dict[str, str] = field(default_factory=dict)
    # Chunks removed by the write's deletes, per store that applied it.
    removed: dict[str, int] = field(default_factory=dict)
    # Why a store refused the write for good ("" when none did).
    rejected: str = ""


@dataclass
class _Drain:
    pending: dict[tuple[int, str], str] = field(default_factory=dict)
    removed: dict[tuple[int, str], int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    def result(self, seq: int) -> WriteResult:
        return WriteResult(
            seq=seq,
            pending={s: e for (q, s), e in self.pending.items() if q == seq},
            removed={s: n for (q, s), n in self.removed.items() if q == seq},
            rejected=self.rejected.get(seq, ""),
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:500]


class JournalFull(RuntimeError):
    """Too many writes of a collection are waiting for a store that is down."""


class StoreWriter:
    def __init__(
        self,
        journal: Journal | Any,
        stores: dict[str, Any],
        timeout_s: float,
        max_pending: int = 1000,
        leases: Leases | None = None,
    ) -> None:
        if set(stores) != set(STORES):
            raise ValueError(f"need exactly the stores {STORES}")
        self.journal = journal
        self.stores = stores
        self.timeout_s = timeout_s
        # Past this many journaled writes in a collection, new ones are refused (503)
        # instead of piling chunks and vectors up on disk during a long outage.
        self.max_pending = max_pending
        self.leases: Leases = leases or LocalLeases()
        # Writes of one collection are serialized: a chain must see every earlier write.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._retry_at: dict[str, float] = {}
        self._failures: defaultdict[str, int] = defaultdict(int)

    @contextlib.asynccontextmanager
    async def exclusive(self, collection: str, wait_s: float) -> AsyncIterator[Lease]:
        """No other write of `collection` runs meanwhile, in this process (the lock) or in
        another replica (the lease); LeaseBusy after `wait_s`."""
        async with self._locks[collection]:
            async with self.leases.hold(collection, wait_s) as lease:
                yield lease

    async def write(self, collection: str, op: WriteOp) -> WriteResult:
        async with self._locks[collection]:
            waiting = await asyncio.to_thread(self.journal.count, collection)
            if waiting >= self.max_pending:
                raise JournalFull(
                    f"{waiting} writes of collection {collection!r} are waiting for an index"
                )
            # Journaled (and acknowledged as such) before any lease: a replica that dies
            # after this line leaves the write for the others to apply.
            seq = await asyncio.to_thread(self.journal.append, collection, op)
            try:
                async with self.leases.hold(collection, self.timeout_s) as lease:
                    drained = await self._drain(collection, lease)
            except LeaseBusy:
                busy = "another replica is applying this collection's writes"
                return WriteResult(seq=seq, pending={store: busy for store in STORES})
        return drained.result(seq)

    async def outcome(self, seq: int) -> tuple[bool, str | None]:
        """(still journaled, why it was refused if it was) for one earlier write."""
        pending = await asyncio.to_thread(self.journal.contains, seq)
        return pending, await asyncio.to_thread(self.journal.refusal, seq)

    async def drain(self, collection: str, wait_s: float | None = None) -> None:
        """Applies `collection`'s journaled writes; returns at once (LeaseBusy) when another
        replica is at it for longer than `wait_s` (the write timeout by default)."""
        async with self.exclusive(
            collection, self.timeout_s if wait_s is None else wait_s
        ) as lease:
            await self._drain(collection, lease)

    async def _drain(self, collection: str, lease: Lease) -> _Drain:
        report = _Drain()
        ops: dict[int, WriteOp] = {}  # loaded once per drain, shared by the two chains
        stores = list(STORES)
        while stores:
            entries = await asyncio.to_thread(self.journal.pending, collection)
            refusals = len(report.rejected)
            await asyncio.gather(
                *(self._chain(store, collection, entries, report, ops, lease) for store in stores)
            )
            if len(report.rejected) == refusals:
                break
            # A refusal journaled an undo: apply it now on the stores that are up.
            failed = {store for (_, store) in report.pending}
            stores = [store for store in stores if store not in failed]
        remaining = await asyncio.to_thread(self.journal.count)
        PENDING_WRITES.set(remaining)
        if report.pending:
            self._failures[collection] += 1
            pause = min(_MAX_BACKOFF_S, 2.0 ** self._failures[collection])
            self._retry_at[collection] = time.monotonic() + pause
        else:
            self._failures.pop(collection, None)
            self._retry_at.pop(collection, None)
        return report

    async def _chain(
        self,
        store: str,
        collection: str,
        entries: list[Entry],
        report: _Drain,
        ops: dict[int, WriteOp],
        lease: Lease,
    ) -> None:
        for entry in entries:
            if entry.done[store]:
                continue
            if lease.lost:  # another replica has taken over this collection's writes
                for later in entries:
                    if later.seq >= entry.seq and not later.done[store]:
                        report.pending[(later.seq, store)] = "lost the collection's lease"
                return
            try:
                if entry.seq not in ops:
                    ops[entry.seq] = await asyncio.to_thread(self.journal.op, entry.seq)
                op = ops[entry.seq]
                removed = await asyncio.wait_for(self._apply(store, collection, op), self.timeout_s)
            except WriteRefused as exc:
                reason = str(exc) or _describe(exc)
                log.error(
                    "store refused a write; its documents are removed from both stores",
                    extra={"store": store, "collection": collection, "error": reason[:500]},
                )
                report.rejected[entry.seq] = reason
                await asyncio.to_thread(
                    self.journal.refuse,
                    entry.seq,
                    collection,
                    store,
                    reason,
                    _undo(entry, exc, entries),
                )
            except Exception as exc:
                reason = _describe(exc)
                WRITE_FAILURES.labels(store).inc()
                log.warning(
                    "store write failed; it stays journaled and will be retried",
                    extra={"store": store, "collection": collection, "error": reason},
                )
                report.pending[(entry.seq, store)] = reason
                await asyncio.to_thread(self.journal.mark_failed, entry.seq, reason)
                # Later writes wait behind this one, or a replay could undo them.
                for later in entries:
                    if later.seq > entry.seq and not later.done[store]:
                        report.pending[(later.seq, store)] = f"waiting behind write {entry.seq}"
                return
            else:
                if entry.attempts:
                    WRITES_REPLAYED.labels(store).inc()
                report.removed[(entry.seq, store)] = removed
                await asyncio.to_thread(self.journal.mark_done, entry.seq, store, collection)

    async def _apply(self, store: str, collection: str, op: WriteOp) -> int:
        index = self.stores[store]
        if index is None:
            raise RuntimeError(f"the {store} index is not open")
        if op.chunks:
            await index.ensure_collection(collection)
            if store == "dense":
                await index.upsert(collection, op.chunks, op.vectors)
            else:
                await index.upsert(collection, op.chunks)
        removed = 0
        for doc_id in op.delete_doc_ids:
            try:
                removed += await index.delete_document(collection, doc_id)
            except CollectionNotFound:
                pass  # nothing to delete where the collection never existed
        return removed

    async def repair_once(self, force: bool = False) -> int:
        """Re-run the chains of collections with journaled writes whose pause is over;
        returns how many writes are still journaled."""
        collections = await asyncio.to_thread(self.journal.collections)
        now = time.monotonic()
        for collection in collections:
            if force or self._retry_at.get(collection, 0.0) <= now:
                with contextlib.suppress(LeaseBusy):  # another replica is draining it
                    await self.drain(collection, wait_s=0)
        return await asyncio.to_thread(self.journal.count)

    async def repair_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.repair_once()
            except Exception:
                log.exception("repair pass failed")
            await asyncio.sleep(interval_s)


def _undo(entry: Entry, refusal: WriteRefused, entries: list[Entry]) -> WriteOp | None:
    """The delete that makes both stores agree after `entry` was refused: its refused
    documents (all of them when the store did not say), except those a later journaled
    write replaces anyway; deleting those would undo the later, good version."""
    if not entry.written_doc_ids:
        return None  # a refused delete needs no undo (and must not loop on one)
    refused = refusal.doc_ids or entry.written_doc_ids + entry.delete_doc_ids
    rewritten = {d for later in entries if later.seq > entry.seq for d in later.written_doc_ids}
    doc_ids = [d for d in dict.fromkeys(refused) if d not in rewritten]
    return WriteOp(delete_doc_ids=doc_ids) if doc_ids else None
