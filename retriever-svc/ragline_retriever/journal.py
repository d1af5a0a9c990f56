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
"""

from __future__ import annotations

import sqlite3
import threading
import time
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
    chunks BLOB NOT NULL,          -- JSON list of chunk payloads
    vectors BLOB NOT NULL,         -- float32, row-major, one row per chunk
    dim INTEGER NOT NULL,
    delete_doc_ids BLOB NOT NULL,  -- JSON list of document ids to remove entirely
    lexical_done INTEGER NOT NULL DEFAULT 0,
    dense_done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS writes_by_collection ON writes (collection, seq);
"""


@dataclass
class WriteOp:
    """What one request does to a collection: replace these documents' chunks, drop those."""

    chunks: list[Chunk] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    delete_doc_ids: list[str] = field(default_factory=list)

    @property
    def doc_ids(self) -> list[str]:
        return list(dict.fromkeys([c.doc_id for c in self.chunks] + self.delete_doc_ids))


@dataclass
class Entry:
    seq: int
    collection: str
    op: WriteOp
    done: dict[str, bool]
    attempts: int
    last_error: str


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection guarded by a lock: writes are small and rare next to embedding.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def append(self, collection: str, op: WriteOp) -> int:
        dim = len(op.vectors[0]) if op.vectors else 0
        vectors = np.asarray(op.vectors, dtype=np.float32).reshape(len(op.vectors), dim)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO writes (collection, chunks, vectors, dim, delete_doc_ids, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    collection,
                    orjson.dumps([c.payload() for c in op.chunks]),
                    vectors.tobytes(),
                    dim,
                    orjson.dumps(op.delete_doc_ids),
                    time.time(),
                ),
            )
            return int(cursor.lastrowid or 0)

    def pending(self, collection: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, chunks, vectors, dim, delete_doc_ids, lexical_done, dense_done,"
                " attempts, last_error FROM writes WHERE collection = ? ORDER BY seq",
                (collection,),
            ).fetchall()
        entries = []
        for seq, chunks, vectors, dim, deletes, lexical, dense, attempts, error in rows:
            payloads = orjson.loads(chunks)
            matrix = np.frombuffer(vectors, dtype=np.float32).reshape(len(payloads), dim)
            op = WriteOp(
                chunks=[Chunk.from_payload(p) for p in payloads],
                vectors=matrix.tolist(),
                delete_doc_ids=list(orjson.loads(deletes)),
            )
            done = {"lexical": bool(lexical), "dense": bool(dense)}
            entries.append(Entry(seq, collection, op, done, attempts, error))
        return entries

    def mark_done(self, seq: int, store: str) -> None:
        column = _column(store)
        with self._lock:
            self._db.execute(f"UPDATE writes SET {column} = 1 WHERE seq = ?", (seq,))
            self._db.execute(
                "DELETE FROM writes WHERE seq = ? AND lexical_done AND dense_done", (seq,)
            )

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


def _column(store: str) -> str:
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}")
    return f"{store}_done"
