"""The write journal and the index versions in Redis, shared by every retriever replica.

The SQLite journal (journal.py) lives in one pod, so only that pod can replay its writes
and only its writes bump its versions. Here the same records live in the Redis the
cluster already runs for the gateway: any replica may accept a write, and if it dies
right after acknowledging it, another replica's repair loop finds the entry and applies
it; every replica reads one version per collection, so the gateway's answer cache is
invalidated whichever replica applied the write (docs/deploying.md, "The retriever's
write log").

Same contract as journal.py, method for method: an entry is appended before either store
is touched and leaves once both have applied it; each store's application (and each
refusal) bumps the collection's version in the same atomic step (a Lua script), after the
write is visible to searches. Sequence numbers come from one counter, so "oldest first"
is the order in which replicas accepted the writes, whichever replica accepted them.
Applying them in that order across replicas is the leases' job (leases.py).

Durability: an append is acknowledged only once Redis has it in its append-only file
(`WAITAOF 1 0`, Redis 7.2+ with `appendonly yes`), so a Redis restart right after an
acknowledged ingest does not lose it. An older or non-AOF Redis is used as it is, with a
warning at start: it keeps what its `appendfsync` setting keeps.

Keys carry no TTL (a journaled write must never be evicted); under the gateway's
`volatile-lru` policy Redis evicts only keys with one. Keys, under `prefix`:
`seq` (counter), `w:<seq>` (hash: one write), `pending` (zset: every journaled seq),
`pending:<collection>` (zset), `collections` (set: those with writes pending),
`version:<collection>` (counter), `epoch`, `refusal:<seq>` (string, kept 7 days),
`written:<collection>` (set for 10 s after each applied write: searches on every replica
read Milvus at Strong consistency meanwhile, so no replica answers from before a write
whose version the gateway already keys its cache on).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
import redis
import redis.asyncio as aioredis

from ragline_retriever.journal import STORES, Encoded, Entry, WriteOp, decode

log = logging.getLogger("ragline.retriever.journal")

_KEEP_REFUSALS_S = 7 * 86400
# How long after a store applied a write every replica treats the collection as freshly
# written (milvus_index.py reads it at Strong then; its own window is 10 s).
RECENT_WRITE_MS = 10_000
# A search waits this long for Redis to say whether the collection was just written;
# past it, it assumes so (a Strong read: slower, never stale).
_RECENT_READ_TIMEOUT_S = 0.05
_WAITAOF_TIMEOUT_MS = 5000

# KEYS: seq, pending, collections; ARGV: prefix, collection, then the hash fields.
# Returns the new seq. One script, so a crash never leaves a hash without its index.
_APPEND = """
local seq = redis.call('INCR', KEYS[1])
local key = ARGV[1] .. 'w:' .. seq
redis.call('HSET', key, 'collection', ARGV[2], 'written', ARGV[3], 'deletes', ARGV[4],
  'chunks', ARGV[5], 'vectors', ARGV[6], 'dim', ARGV[7], 'lexical_done', 0,
  'dense_done', 0, 'attempts', 0, 'last_error', '', 'created', ARGV[8])
redis.call('ZADD', KEYS[2], seq, seq)
redis.call('ZADD', ARGV[1] .. 'pending:' .. ARGV[2], seq, seq)
redis.call('SADD', KEYS[3], ARGV[2])
return seq
"""

# Marks ARGV[3] ('lexical' or 'dense') done for write ARGV[2] and bumps the collection's
# version; drops the write once both stores have it. ARGV[4]: the write's collection, or
# '' to read it from the write (nothing happens when the write is already gone).
# KEYS: pending, collections. Returns the new version counter, or false.
_DONE = """
local key = ARGV[1] .. 'w:' .. ARGV[2]
local collection = ARGV[4]
if collection == '' then
  collection = redis.call('HGET', key, 'collection')
  if not collection then return false end
end
if redis.call('EXISTS', key) == 1 then
  redis.call('HSET', key, ARGV[3] .. '_done', 1)
  local done = redis.call('HMGET', key, 'lexical_done', 'dense_done')
  if done[1] == '1' and done[2] == '1' then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], ARGV[2])
    local per = ARGV[1] .. 'pending:' .. collection
    redis.call('ZREM', per, ARGV[2])
    if redis.call('ZCARD', per) == 0 then redis.call('SREM', KEYS[2], collection) end
  end
end
-- Searches on every replica read Strong while this key lives (RECENT_WRITE_MS).
redis.call('SET', ARGV[1] .. 'written:' .. collection, 1, 'PX', ARGV[5])
return redis.call('INCR', ARGV[1] .. 'version:' .. collection)
"""

# Counts a failed attempt on a write still journaled (never recreates a dropped one).
_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_error', ARGV[1])
return 1
"""


def _version_at_least(info: dict, major: int, minor: int) -> bool:
    parts = str(info.get("redis_version", "0.0")).split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


class AofWaiter:
    """Makes an acknowledged write wait until Redis has it in its append-only file, where
    Redis can (7.2+, `appendonly yes`); says once at start when it cannot."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self.enabled: bool | None = None  # checked on first use

    def _check(self) -> bool:
        info = self._redis.info("server")
        if not _version_at_least(info, 7, 2):
            log.warning(
                "Redis %s has no WAITAOF: an acknowledged write is as durable as its "
                "appendfsync setting makes it (use Redis 7.2+ with appendonly yes)",
                info.get("redis_version"),
            )
            return False
        try:
            self._redis.execute_command("WAITAOF", 1, 0, _WAITAOF_TIMEOUT_MS)
        except redis.ResponseError as exc:
            log.warning(
                "Redis cannot wait for its append-only file (%s): an acknowledged write "
                "may be lost if Redis restarts; run it with appendonly yes",
                exc,
            )
            return False
        return True

    def wait(self) -> None:
        if self.enabled is None:
            self.enabled = self._check()
        if self.enabled:
            local, _ = self._redis.execute_command("WAITAOF", 1, 0, _WAITAOF_TIMEOUT_MS)
            if int(local) < 1:
                raise redis.TimeoutError("Redis did not write the entry to its append-only file")


class RedisJournal:
    """journal.Journal's methods over Redis (blocking calls: the writer runs them in
    threads, as it does SQLite's)."""

    remote = True

    def __init__(self, url: str, prefix: str = "ragline:retriever:") -> None:
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._append = self._redis.register_script(_APPEND)
        self._done = self._redis.register_script(_DONE)
        self._failed = self._redis.register_script(_FAILED)
        # Both read from Redis on first use: a retriever starts (and answers searches)
        # while Redis is down; only writes and index versions wait for it.
        self._epoch = ""
        self._async: aioredis.Redis | None = None  # searches' reads, on the event loop
        self._aof = AofWaiter(self._redis)

    @property
    def epoch(self) -> str:
        if not self._epoch:
            self._redis.set(self._key("epoch"), secrets.token_hex(8), nx=True)
            self._epoch = self._redis.get(self._key("epoch")).decode()  # type: ignore[union-attr]
        return self._epoch

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _durable(self) -> None:
        self._aof.wait()

    async def written_recently(self, collection: str) -> bool:
        """Whether any replica applied a write of `collection` in the last RECENT_WRITE_MS
        (one Redis read per search, only with the shared log)."""
        if self._async is None:
            self._async = aioredis.Redis.from_url(self.url, socket_timeout=1)
        try:
            key = self._key(f"written:{collection}")
            return bool(await asyncio.wait_for(self._async.exists(key), _RECENT_READ_TIMEOUT_S))
        except (TimeoutError, OSError, redis.RedisError):
            return True

    def version(self, collection: str) -> str:
        """`collection`'s index version, "<epoch>-<counter>", as every replica reads it."""
        counter = self._redis.get(self._key(f"version:{collection}"))
        return f"{self.epoch}-{int(counter or 0)}"

    def append(self, collection: str, op: WriteOp) -> int:
        e = Encoded.of(op)
        seq = self._append(
            keys=[self._key("seq"), self._key("pending"), self._key("collections")],
            args=[self.prefix, collection, e.written_doc_ids, e.delete_doc_ids, e.chunks,
                  e.vectors, e.dim, time.time()],
        )  # fmt: skip
        self._durable()
        return int(seq)

    def pending(self, collection: str) -> list[Entry]:
        seqs = [int(s) for s in self._redis.zrange(self._key(f"pending:{collection}"), 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for seq in seqs:
            pipe.hmget(
                self._key(f"w:{seq}"),
                ["written", "deletes", "lexical_done", "dense_done", "attempts"],
            )
        entries = []
        for seq, row in zip(seqs, pipe.execute(), strict=True):
            written, deletes, lexical, dense, attempts = row
            if written is None:
                continue  # applied and dropped between the two reads
            entries.append(
                Entry(
                    seq=seq,
                    written_doc_ids=list(orjson.loads(written)),
                    delete_doc_ids=list(orjson.loads(deletes)),
                    done={"lexical": lexical == b"1", "dense": dense == b"1"},
                    attempts=int(attempts or 0),
                )
            )
        return entries

    def op(self, seq: int) -> WriteOp:
        chunks, vectors, dim, deletes = self._redis.hmget(
            self._key(f"w:{seq}"), ["chunks", "vectors", "dim", "deletes"]
        )
        if chunks is None:
            raise KeyError(seq)
        return decode(chunks, vectors or b"", int(dim or 0), deletes)

    def mark_done(self, seq: int, store: str, collection: str | None = None) -> None:
        if store not in STORES:
            raise ValueError(f"unknown store {store!r}")
        self._done(
            keys=[self._key("pending"), self._key("collections")],
            args=[self.prefix, seq, store, collection or "", RECENT_WRITE_MS],
        )

    def refuse(
        self, seq: int, collection: str, store: str, reason: str, undo: WriteOp | None
    ) -> None:
        """journal.Journal.refuse: the refusal and the undo are recorded before the write
        is marked done, so a crash in between leaves the write to be retried (and refused
        again), never the write off the books without its undo."""
        self._redis.set(self._key(f"refusal:{seq}"), reason[:2000], ex=_KEEP_REFUSALS_S)
        if undo is not None and undo.delete_doc_ids:
            self.append(collection, undo)
        self.mark_done(seq, store, collection)

    def refusal(self, seq: int) -> str | None:
        reason = self._redis.get(self._key(f"refusal:{seq}"))
        return reason.decode() if reason is not None else None

    def contains(self, seq: int) -> bool:
        return self._redis.zscore(self._key("pending"), seq) is not None

    def mark_failed(self, seq: int, error: str) -> None:
        self._failed(keys=[self._key(f"w:{seq}")], args=[error[:2000]])

    def collections(self) -> list[str]:
        """Collections with writes still to apply, oldest first."""
        names = [n.decode() for n in self._redis.smembers(self._key("collections"))]
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.zrange(self._key(f"pending:{name}"), 0, 0)
        firsts = pipe.execute()
        waiting = [(int(f[0]), n) for n, f in zip(names, firsts, strict=True) if f]
        return [name for _, name in sorted(waiting)]

    def count(self, collection: str | None = None) -> int:
        key = "pending" if collection is None else f"pending:{collection}"
        return int(self._redis.zcard(self._key(key)))

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
