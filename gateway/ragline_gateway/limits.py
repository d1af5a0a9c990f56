"""Per-key rate limits: requests per minute and concurrent streams, shared by every
gateway replica through Redis.

One Lua script checks and records both in a single atomic step on the Redis server, so
two replicas admitting the same key at the same instant cannot both take the last slot,
and the clock is Redis's own (`TIME`), not each replica's.

- Requests per minute: a sliding log (a sorted set of request times): at most N requests
  in any 60 s window, and `Retry-After` says when the oldest one leaves it.
- Concurrent streams: a sorted set of leases scored by expiry. A replica renews its leases
  while their streams run and removes them at the end; a replica that dies leaves leases
  that expire after `stream_lease_ttl_s`, so its streams do not count for ever.
- Calls per minute: every authenticated call of a key (reads such as `GET /v1/models`
  and `/api/jobs/...` included, and calls refused after authentication) goes through a
  second sliding log with `requests_per_minute` x `call_rate_multiplier` calls a minute
  (`acquire_call`), so no route is unlimited while reads stay cheap: a client polling its
  ingest job does not use up the rate its questions need.

When Redis is down or slow, `on_redis_error` decides: `closed` (default) refuses with
503, `open` admits without limits. Without Redis at all (none installed) an in-process
limiter with the same rules serves one replica, with a warning at start-up.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from ragline_common.errors import ApiError
from ragline_gateway import metrics
from ragline_gateway.auth import Caller

log = logging.getLogger("ragline.limits")

WINDOW_MS = 60_000

# KEYS[1]: the key's request log (zset: member request id, score time in ms)
# KEYS[2]: the key's open streams (zset: member lease id, score expiry in ms)
# ARGV: requests per minute (0: none), max streams (0: none, or not a stream), lease id,
#       lease ttl ms, window ms
# Returns {1} when admitted, {0, reason, retry_after_ms} when not.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute, max_streams = tonumber(ARGV[1]), tonumber(ARGV[2])
local id, ttl, window = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_streams then
    return {0, 'streams', 1000}
  end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, 'rate', tonumber(oldest[2]) + window - now}
  end
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
end
if max_streams > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, id)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1}
"""

# KEYS[1]: open streams; ARGV: lease ttl ms, lease ids... (only leases still held move)
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


@dataclass(frozen=True, slots=True)
class Lease:
    key_id: str
    lease_id: str
    stream: bool


class Limiter(Protocol):
    async def acquire(self, caller: Caller, stream: bool) -> Lease | None: ...

    async def acquire_call(self, caller: Caller, per_minute: int) -> None: ...

    async def release(self, lease: Lease) -> None: ...

    async def aclose(self) -> None: ...


def _refuse(reason: str, retry_after_ms: float) -> ApiError:
    metrics.RATE_LIMITED.labels(reason).inc()
    seconds = str(max(1, math.ceil(retry_after_ms / 1000)))
    if reason == "streams":
        message = "too many answers in progress for this API key; retry when one ends"
    elif reason == "calls":
        message = "call rate limit of this API key reached"
    else:
        message = "request rate limit of this API key reached"
    return ApiError(429, "rate_limited", message, headers={"Retry-After": seconds})


def _streams_limit(caller: Caller, stream: bool) -> int:
    return caller.max_streams if stream else 0


class RedisLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        on_redis_error: Literal["closed", "open"],
        lease_ttl_s: float,
    ) -> None:
        self.client = client
        self.on_redis_error = on_redis_error
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self.held: dict[str, set[str]] = defaultdict(set)  # key id -> lease ids held here
        self._renewer: asyncio.Task[None] | None = None

    @staticmethod
    def _keys(key_id: str, log: str = "requests") -> list[str]:
        # `{key_id}` is a hash tag: both keys land in one Redis Cluster slot, as a
        # multi-key script requires.
        return [f"ragline:rl:{{{key_id}}}:{log}", f"ragline:rl:{{{key_id}}}:streams"]

    async def acquire(self, caller: Caller, stream: bool) -> Lease | None:
        max_streams = _streams_limit(caller, stream)
        if not caller.requests_per_minute and not max_streams:
            return None
        lease = Lease(caller.key_id, uuid.uuid4().hex, bool(max_streams))
        args = [caller.requests_per_minute, max_streams, lease.lease_id, self.lease_ttl_ms,
                WINDOW_MS]  # fmt: skip
        if not await self._run_admit(self._keys(caller.key_id), args):
            return None  # Redis failed, and the limiter fails open
        if lease.stream:
            self.held[lease.key_id].add(lease.lease_id)
            self._ensure_renewer()
        return lease

    async def acquire_call(self, caller: Caller, per_minute: int) -> None:
        """One call against the key's calls-per-minute log (`per_minute` 0: none)."""
        if per_minute:
            args = [per_minute, 0, uuid.uuid4().hex, self.lease_ttl_ms, WINDOW_MS]
            await self._run_admit(self._keys(caller.key_id, "calls"), args, reason="calls")

    async def _run_admit(self, keys: list[str], args: list[object], reason: str = "") -> bool:
        """The admission script: True when admitted and recorded, False when Redis failed
        and the limiter fails open; raises the refusal (429), or 503 when Redis failed and
        the limiter fails closed. `reason` names the refusal in place of the script's."""
        try:
            result = await self._admit(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("rate_limit").inc()
            if self.on_redis_error == "open":
                log.warning("rate limiter unavailable; admitting (fail open)",
                            extra={"error": repr(exc)})  # fmt: skip
                return False
            log.warning("rate limiter unavailable; refusing (fail closed)",
                        extra={"error": repr(exc)})  # fmt: skip
            raise ApiError(
                503, "rate_limiter_unavailable",
                "the rate limiter is unavailable; please retry shortly",
                headers={"Retry-After": "5"},
            ) from exc  # fmt: skip
        if int(result[0]) != 1:
            said = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
            raise _refuse(reason or said, float(result[2]))
        return True

    async def release(self, lease: Lease) -> None:
        if not lease.stream:
            return
        held = self.held.get(lease.key_id)
        if held is not None:
            held.discard(lease.lease_id)
            if not held:
                del self.held[lease.key_id]
        try:
            await self.client.zrem(self._keys(lease.key_id)[1], lease.lease_id)
        except (RedisError, OSError) as exc:
            # The lease expires on its own after its ttl.
            metrics.REDIS_ERRORS.labels("rate_limit").inc()
            log.warning("could not release a stream lease", extra={"error": repr(exc)})

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            # Started by whichever request first held a lease, but serving every stream after
            # it: an empty context, or its log lines would name that long-finished request.
            self._renewer = asyncio.create_task(
                self._renew_forever(), context=contextvars.Context()
            )

    async def _renew_forever(self) -> None:
        """Renews every held lease a few times per ttl, one script call per key."""
        while self.held:
            await asyncio.sleep(self.lease_ttl_ms / 3000)
            for key_id, leases in list(self.held.items()):
                if not leases:
                    continue
                try:
                    await self._renew(
                        keys=[self._keys(key_id)[1]], args=[self.lease_ttl_ms, *leases]
                    )
                except (RedisError, OSError) as exc:
                    metrics.REDIS_ERRORS.labels("rate_limit").inc()
                    log.warning("could not renew stream leases", extra={"error": repr(exc)})

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()


class LocalLimiter:
    """The same rules in this process: for a single replica without Redis."""

    def __init__(self) -> None:
        self.requests: defaultdict[str, deque[float]] = defaultdict(deque)
        self.calls: defaultdict[str, deque[float]] = defaultdict(deque)
        self.streams: defaultdict[str, set[str]] = defaultdict(set)
        log.warning("no redis_url set: rate limits are per process (single replica only)")

    async def acquire(self, caller: Caller, stream: bool) -> Lease | None:
        max_streams = _streams_limit(caller, stream)
        now = time.monotonic() * 1000
        key = caller.key_id
        if max_streams and len(self.streams[key]) >= max_streams:
            raise _refuse("streams", 1000)
        if caller.requests_per_minute:
            _admit_local(self.requests[key], caller.requests_per_minute, now, "rate")
        if not max_streams:
            return None
        lease = Lease(key, uuid.uuid4().hex, True)
        self.streams[key].add(lease.lease_id)
        return lease

    async def acquire_call(self, caller: Caller, per_minute: int) -> None:
        if per_minute:
            _admit_local(self.calls[caller.key_id], per_minute, time.monotonic() * 1000, "calls")

    async def release(self, lease: Lease) -> None:
        self.streams[lease.key_id].discard(lease.lease_id)

    async def aclose(self) -> None:
        return None


def _admit_local(log_: deque[float], per_minute: int, now: float, reason: str) -> None:
    """The sliding log of the Lua script, in this process."""
    while log_ and log_[0] <= now - WINDOW_MS:
        log_.popleft()
    if len(log_) >= per_minute:
        raise _refuse(reason, log_[0] + WINDOW_MS - now)
    log_.append(now)
