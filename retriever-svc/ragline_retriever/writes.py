"""Writes to the two stores through the journal, so that they converge.

Each write is journaled first, then every journaled write of the collection that a store
has not applied yet is applied to that store, oldest first. A store that fails stops its
own chain there (later writes wait behind the failed one, so a replay can never put an
old version over a newer one); the other store goes on. The repair loop re-runs the
chains of every collection that still has journaled writes, with a growing pause while a
store stays down, until both stores have applied everything.

A store that refuses a write for good (a `ValueError`, such as an Elasticsearch mapping
conflict) would block its chain forever if retried. Such a write is marked done for that
store and followed by a journaled delete of the refused documents (all of the write's
when the store does not say which), so the two stores agree again (those documents are
absent from both) and the caller is told to fix and resend them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ragline_retriever.backends.base import CollectionNotFound
from ragline_retriever.journal import STORES, Entry, Journal, WriteOp
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
    # The documents a store refused, per write (empty: the whole write).
    refused_docs: dict[int, list[str]] = field(default_factory=dict)

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


class StoreWriter:
    def __init__(self, journal: Journal, stores: dict[str, Any], timeout_s: float) -> None:
        if set(stores) != set(STORES):
            raise ValueError(f"need exactly the stores {STORES}")
        self.journal = journal
        self.stores = stores
        self.timeout_s = timeout_s
        # Writes of one collection are serialized: a chain must see every earlier write.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._retry_at: dict[str, float] = {}
        self._failures: defaultdict[str, int] = defaultdict(int)

    def lock(self, collection: str) -> asyncio.Lock:
        return self._locks[collection]

    async def write(self, collection: str, op: WriteOp) -> WriteResult:
        async with self.lock(collection):
            seq = await asyncio.to_thread(self.journal.append, collection, op)
            drained = await self._drain(collection)
        return drained.result(seq)

    async def drain(self, collection: str) -> None:
        async with self.lock(collection):
            await self._drain(collection)

    async def _drain(self, collection: str) -> _Drain:
        report = _Drain()
        for _ in range(2):  # a second pass applies the deletes that follow a refused write
            entries = await asyncio.to_thread(self.journal.pending, collection)
            if not entries:
                break
            await asyncio.gather(
                *(self._chain(store, collection, entries, report) for store in STORES)
            )
            # A refused delete needs no undo (and must not loop on one).
            refused = [e for e in entries if e.seq in report.refused_docs and e.op.chunks]
            for entry in refused:
                undo = WriteOp(delete_doc_ids=report.refused_docs[entry.seq] or entry.op.doc_ids)
                await asyncio.to_thread(self.journal.append, collection, undo)
            if not refused:
                break
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
        self, store: str, collection: str, entries: list[Entry], report: _Drain
    ) -> None:
        for entry in entries:
            if entry.done[store]:
                continue
            try:
                removed = await asyncio.wait_for(
                    self._apply(store, collection, entry.op), self.timeout_s
                )
            except ValueError as exc:
                reason = _describe(exc)
                log.error(
                    "store refused a write; its documents are removed from both stores",
                    extra={"store": store, "collection": collection, "error": reason},
                )
                report.rejected[entry.seq] = str(exc) or reason
                report.refused_docs.setdefault(entry.seq, []).extend(getattr(exc, "doc_ids", []))
                await asyncio.to_thread(self.journal.mark_done, entry.seq, store)
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
                await asyncio.to_thread(self.journal.mark_done, entry.seq, store)

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
                await self.drain(collection)
        return await asyncio.to_thread(self.journal.count)

    async def repair_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.repair_once()
            except Exception:
                log.exception("repair pass failed")
            await asyncio.sleep(interval_s)
