"""Conversation memory: the last turns of a conversation, kept in Redis with a TTL.

A conversation belongs to the API key that started it, in the collection it started in
(see `RedisMemory`). Without Redis (no URL configured) turns are kept in this process:
fine for one replica on a laptop, wrong behind a load balancer, hence the warning at
start-up. A Redis failure never fails an answer: the pipeline skips memory and says so in
`degraded`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import orjson
import redis.asyncio as redis

log = logging.getLogger("ragline.memory")


@dataclass(frozen=True, slots=True)
class Turn:
    question: str
    answer: str


class ConversationMemory(Protocol):
    async def load(self, conversation_id: str, turns: int) -> list[Turn]: ...

    async def append(self, conversation_id: str, turn: Turn, keep: int) -> None: ...

    async def aclose(self) -> None: ...


class RedisMemory:
    """Conversation ids arrive prefixed with their owner's scope (pipeline.py,
    auth.Caller.conversation_scope): `tenant:key id:collection:conversation id` with API
    keys, so that no other key, of another tenant or the same one, reads or extends a
    conversation by sending its id, and no conversation carries one collection's passages
    into answers from another; `local:conversation id` in anonymous mode."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    @staticmethod
    def _key(conversation_id: str) -> str:
        return f"ragline:conv:{conversation_id}"

    async def load(self, conversation_id: str, turns: int) -> list[Turn]:
        if turns <= 0:
            return []
        raw = await self.client.lrange(self._key(conversation_id), -turns, -1)
        return [Turn(**orjson.loads(item)) for item in raw]

    async def append(self, conversation_id: str, turn: Turn, keep: int) -> None:
        key = self._key(conversation_id)
        item = orjson.dumps({"question": turn.question, "answer": turn.answer})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, item).ltrim(key, -max(keep, 1), -1).expire(key, self.ttl_s)
            await pipe.execute()

    async def aclose(self) -> None:
        return None  # the Redis client is the app's, shared with cache and limits


class LocalMemory:
    """In-process fallback, bounded in conversations and turns."""

    def __init__(self, max_conversations: int = 10_000) -> None:
        self.max_conversations = max_conversations
        self.turns: OrderedDict[str, deque[Turn]] = OrderedDict()
        log.warning("no redis_url set: conversation memory is per process (single replica only)")

    async def load(self, conversation_id: str, turns: int) -> list[Turn]:
        history = self.turns.get(conversation_id)
        return list(history)[-turns:] if history and turns > 0 else []

    async def append(self, conversation_id: str, turn: Turn, keep: int) -> None:
        history = self.turns.pop(conversation_id, None) or deque(maxlen=max(keep, 1))
        history.append(turn)
        self.turns[conversation_id] = history
        while len(self.turns) > self.max_conversations:
            self.turns.popitem(last=False)

    async def aclose(self) -> None:
        return None
