"""The answer cache: a repeated question is answered from Redis in milliseconds.

The key holds everything the answer depends on: tenant, collection, the normalised
question, filters, the generation settings, the prompt, and the collection's index
version from retriever-svc. The retriever bumps that version whenever a store applies a
write, after the write is searchable, so ingesting or deleting a document makes every
answer it could change unreachable; nothing has to find and delete old entries, they
simply expire (`cache_ttl_s`).

Only first turns are cached (a follow-up's answer depends on its conversation), and only
answers that completed without a degraded stage. A Redis failure skips the cache; it never
fails an answer.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as redis

log = logging.getLogger("ragline.cache")

_TRAILING = " \t\n?!.。"  # NFKC has already made full-width marks ASCII


def normalise(question: str) -> str:
    """Case, Unicode width, spacing and final punctuation do not change the answer."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return " ".join(text.split()).rstrip(_TRAILING)


def cache_key(
    *,
    tenant: str,
    collection: str,
    question: str,
    filters: dict[str, Any],
    generation: dict[str, Any],
    index_version: str,
) -> str:
    material = orjson.dumps(
        {
            "t": tenant,
            "c": collection,
            "q": normalise(question),
            "f": filters,
            "g": generation,
            "v": index_version,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return "ragline:answer:" + hashlib.sha256(material).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    answer: str
    sources: list[dict[str, Any]]
    usage: dict[str, Any]
    finish_reason: str

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> CachedAnswer:
        return cls(**orjson.loads(raw))


class AnswerCache(Protocol):
    async def get(self, key: str) -> CachedAnswer | None: ...

    async def put(self, key: str, answer: CachedAnswer) -> None: ...


class RedisCache:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def get(self, key: str) -> CachedAnswer | None:
        raw = await self.client.get(key)
        return CachedAnswer.loads(raw) if raw else None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        await self.client.set(key, answer.dumps(), ex=self.ttl_s)


class LocalCache:
    """In-process LRU with the same ttl, for a single replica without Redis."""

    def __init__(self, ttl_s: int, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> CachedAnswer | None:
        found = self.entries.get(key)
        if found is None or found[0] < time.monotonic():
            self.entries.pop(key, None)
            return None
        self.entries.move_to_end(key)
        return CachedAnswer.loads(found[1])

    async def put(self, key: str, answer: CachedAnswer) -> None:
        self.entries[key] = (time.monotonic() + self.ttl_s, answer.dumps())
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
