"""A durable log of index writes, so the two stores converge after a half-done write.

Every ingest and delete is appended here (chunks, vectors and the documents to drop)
before either store is touched, and each store's progress on it is recorded as it lands.
An entry leaves the journal only once both stores have applied it. So a crash, a timeout
or an outage of one store between the two writes leaves a record from which the write is
replayed later, in order, without re-embedding anything.

SQLite in the data directory: one file, transactional, in the standard library. Each
replica keeps its own journal of its own writes; give it a persistent volume wherever
the indexes are remote, or a crash loses the record of a half-done write (the `verify`
endpoint still finds the damage).

Index versions: each collection has a counter here, bumped every time a store applies one
of its writes (each `mark_done`, once per store) and on each refusal, in the same
transaction as that bookkeeping, so always after the write is visible to searches in that
store. `version()` reads it from memory as "<epoch>-<counter>": the epoch is random per
journal database (kept in `meta`), so a wiped data directory never hands out an old
version string again, and a collection never written is at counter 0. The gateway keys
its answer cache on it: an answer cached under a version was computed from data at least
as new as that version, and any later change to what a search can see bumps it again (an
answer cached while only one store had a write is dropped when the other applies it). A
store write that times out but lands later in its worker thread is visible before its
bump; the bump comes when its retry is marked done.

The version is per retriever replica, like the journal: a deployment with several
retriever replicas writing must send a collection's writes and its version reads to the
same replica, or accept that another replica's write does not invalidate cached answers
until this replica's own version of that collection changes.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from ragline_retriever.backends.base import Chunk

STORES = ("lexical", "dense")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    written_doc_ids BLOB NOT NULL, -- JSON list: documents whose chunks this write replaces
    delete_doc_ids BLOB NOT NULL,  -- JSON list: documents this write removes entirely
    chunks BLOB NOT NULL,          -- JSON list of chunk payloads
    vectors BLOB NOT NULL,         -- float32, row-major, one row per chunk
    dim INTEGER NOT NULL,
    lexical_done INTEGER NOT NULL DEFAULT 0,
    dense_done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS writes_by_collection ON writes (collection, seq);
-- Why a store refused a write for good, kept for a while after the write left the journal
-- so that whoever waits on it (an ingest job) learns the outcome.
CREATE TABLE IF NOT EXISTS refusals (
    seq INTEGER PRIMARY KEY,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
-- Per-collection index versions: bumped each time a store applies a write of the collection.
CREATE TABLE IF NOT EXISTS versions (
    collection TEXT PRIMARY KEY,
    counter INTEGER NOT NULL
);
-- Small facts about this database; "epoch" prefixes every version string it hands out.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
_KEEP_REFUSALS_S = 7 * 86400


@dataclass
class WriteOp:
    """What one request does to a collection: replace these documents' chunks, drop those."""

    chunks: list[Chunk] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    delete_doc_ids: list[str] = field(default_factory=list)

    @property
    def written_doc_ids(self) -> list[str]:
        return list(dict.fromkeys(c.doc_id for c in self.chunks))


@dataclass
class Entry:
    """A journaled write without its chunks and vectors (`Journal.op` loads those), so a
    long journal behind a store that is down costs little to scan."""

    seq: int
    written_doc_ids: list[str]
    delete_doc_ids: list[str]
    done: dict[str, bool]
    attempts: int


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection guarded by a lock: writes are small and rare next to embedding.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged "journaled, will be applied" must survive a power cut.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # Index versions bumped by the open transaction, published once it commits.
        self._bumped: dict[str, int] = {}
        with self._transaction() as db:
            # A crash between two statements of an older version.
            db.execute("DELETE FROM writes WHERE lexical_done AND dense_done")
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)",
                (secrets.token_hex(8),),
            )
            self.epoch: str = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            # Read here once; the request path reads only this copy.
            self._versions: dict[str, int] = dict(
                db.execute("SELECT collection, counter FROM versions").fetchall()
            )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._bumped.clear()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._bumped.clear()
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            # After the commit and still under the lock: a reader never sees a version that
            # is not durable, and two commits cannot publish their counters out of order.
            self._versions.update(self._bumped)
            self._bumped.clear()

    def _bump(self, db: sqlite3.Connection, collection: str) -> None:
        """Advances `collection`'s version inside the open transaction (under the lock)."""
        row = db.execute(
            "INSERT INTO versions (collection, counter) VALUES (?, 1)"
            " ON CONFLICT (collection) DO UPDATE SET counter = counter + 1 RETURNING counter",
            (collection,),
        ).fetchone()
        self._bumped[collection] = int(row[0])

    def version(self, collection: str) -> str:
        """`collection`'s index version, "<epoch>-<counter>", from memory (no SQLite read):
        it changes after every write a store has applied, and never repeats for other data."""
        return f"{self.epoch}-{self._versions.get(collection, 0)}"

    def append(self, collection: str, op: WriteOp) -> int:
        with self._transaction() as db:
            return _insert(db, collection, op)

    def pending(self, collection: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, written_doc_ids, delete_doc_ids, lexical_done, dense_done, attempts"
                " FROM writes WHERE collection = ? ORDER BY seq",
                (collection,),
            ).fetchall()
        return [
            Entry(
                seq=seq,
                written_doc_ids=list(orjson.loads(written)),
                delete_doc_ids=list(orjson.loads(deletes)),
                done={"lexical": bool(lexical), "dense": bool(dense)},
                attempts=attempts,
            )
            for seq, written, deletes, lexical, dense, attempts in rows
        ]

    def op(self, seq: int) -> WriteOp:
        with self._lock:
            row = self._db.execute(
                "SELECT chunks, vectors, dim, delete_doc_ids FROM writes WHERE seq = ?", (seq,)
            ).fetchone()
        if row is None:
            raise KeyError(seq)
        return decode(*row)

    def mark_done(self, seq: int, store: str, collection: str | None = None) -> None:
        """Records that `store` applied write `seq` (now visible to its searches) and bumps
        the collection's version in the same transaction. `collection` is the write's own;
        without it, it is read from the journal (nothing happens for a write already gone)."""
        with self._transaction() as db:
            if collection is None:
                row = db.execute("SELECT collection FROM writes WHERE seq = ?", (seq,)).fetchone()
                if row is None:
                    return
                collection = str(row[0])
            _done(db, seq, store)
            self._bump(db, collection)

    def refuse(
        self, seq: int, collection: str, store: str, reason: str, undo: WriteOp | None
    ) -> None:
        """Records in one transaction that `store` refused write `seq` for good, and
        journals the delete that makes both stores agree again; a crash in between
        could otherwise lose the undo while the write is already off the books."""
        now = time.time()
        with self._transaction() as db:
            _done(db, seq, store)  # may remove the row: the other store already had it
            # The rest of the batch may have landed in `store`, and the undo is yet to come.
            self._bump(db, collection)
            db.execute(
                "INSERT OR REPLACE INTO refusals (seq, reason, created) VALUES (?, ?, ?)",
                (seq, reason[:2000], now),
            )
            db.execute("DELETE FROM refusals WHERE created < ?", (now - _KEEP_REFUSALS_S,))
            if undo is not None and undo.delete_doc_ids:
                _insert(db, collection, undo)

    def refusal(self, seq: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT reason FROM refusals WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def contains(self, seq: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM writes WHERE seq = ?", (seq,)).fetchone()
        return row is not None

    def mark_failed(self, seq: int, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE writes SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error[:2000], seq),
            )

    def collections(self) -> list[str]:
        """Collections with writes still to apply, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT collection, MIN(seq) AS first FROM writes GROUP BY collection"
                " ORDER BY first"
            ).fetchall()
        return [row[0] for row in rows]

    def count(self, collection: str | None = None) -> int:
        with self._lock:
            if collection is None:
                row = self._db.execute("SELECT COUNT(*) FROM writes").fetchone()
            else:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM writes WHERE collection = ?", (collection,)
                ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class Encoded:
    """A WriteOp as both journals store it: JSON lists, and the vectors as float32 rows."""

    written_doc_ids: bytes
    delete_doc_ids: bytes
    chunks: bytes
    vectors: bytes
    dim: int

    @classmethod
    def of(cls, op: WriteOp) -> Encoded:
        dim = len(op.vectors[0]) if op.vectors else 0
        vectors = np.asarray(op.vectors, dtype=np.float32).reshape(len(op.vectors), dim)
        return cls(
            orjson.dumps(op.written_doc_ids),
            orjson.dumps(op.delete_doc_ids),
            orjson.dumps([c.payload() for c in op.chunks]),
            vectors.tobytes(),
            dim,
        )


def decode(chunks: bytes, vectors: bytes, dim: int, delete_doc_ids: bytes) -> WriteOp:
    payloads = orjson.loads(chunks)
    matrix = np.frombuffer(vectors, dtype=np.float32).reshape(len(payloads), dim)
    return WriteOp(
        chunks=[Chunk.from_payload(p) for p in payloads],
        vectors=matrix.tolist(),
        delete_doc_ids=list(orjson.loads(delete_doc_ids)),
    )


def _insert(db: sqlite3.Connection, collection: str, op: WriteOp) -> int:
    e = Encoded.of(op)
    cursor = db.execute(
        "INSERT INTO writes (collection, written_doc_ids, delete_doc_ids, chunks, vectors, dim,"
        " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (collection, e.written_doc_ids, e.delete_doc_ids, e.chunks, e.vectors, e.dim, time.time()),
    )
    return int(cursor.lastrowid or 0)


def _done(db: sqlite3.Connection, seq: int, store: str) -> None:
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}")
    db.execute(f"UPDATE writes SET {store}_done = 1 WHERE seq = ?", (seq,))
    db.execute("DELETE FROM writes WHERE seq = ? AND lexical_done AND dense_done", (seq,))
