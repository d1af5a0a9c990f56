"""Who may apply a collection's journaled writes right now: one holder at a time.

The journal orders writes; applying them in that order needs a single applier per
collection, or two replicas draining at once could land an old version of a document
over a newer one. In one process an asyncio lock does it (`LocalLeases`). Across
replicas it is a lease in Redis (`RedisLeases`): `SET NX PX` with a random token,
renewed by the holder every third of its time to live, released by compare-and-delete.
A holder that dies stops renewing, and the lease passes on after `ttl_s`: that is how
long the writes an acknowledged-then-killed replica left behind wait for another replica.

A lease is not a fence: a holder frozen past `ttl_s` (a stopped VM) may still have one
store write in flight when the next holder starts. The writer checks `lost` before every
store write, so at most that one write overlaps; the stores make it harmless for an
upsert of the same chunks and rare otherwise (docs/deploying.md says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Protocol

import redis.asyncio as aioredis

log = logging.getLogger("ragline.retriever.leases")


class LeaseBusy(Exception):
    """Another holder kept the lease for the whole wait."""


class Lease:
    def __init__(self) -> None:
        # Set when renewal found the lease gone (expired, or taken over): stop writing.
        self.lost = False


class Leases(Protocol):
    def hold(self, name: str, wait_s: float) -> contextlib.AbstractAsyncContextManager[Lease]:
        """The lease on `name` for the block; LeaseBusy after `wait_s` without it."""
        ...

    async def aclose(self) -> None: ...


class LocalLeases:
    """One process is the only applier; the writer's asyncio lock already serialises it."""

    @contextlib.asynccontextmanager
    async def hold(self, name: str, wait_s: float) -> AsyncIterator[Lease]:
        yield Lease()

    async def aclose(self) -> None:
        pass


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    def __init__(self, url: str, prefix: str = "ragline:retriever:", ttl_s: float = 10.0) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    @contextlib.asynccontextmanager
    async def hold(self, name: str, wait_s: float) -> AsyncIterator[Lease]:
        key = f"{self.prefix}lease:{name}"
        # Says who holds it (`GET <prefix>lease:<name>` while looking into a stuck write).
        token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        deadline = time.monotonic() + wait_s
        pause = 0.02
        while not await self._redis.set(key, token, nx=True, px=self.ttl_ms):
            if time.monotonic() + pause > deadline:
                raise LeaseBusy(name)
            await asyncio.sleep(pause)  # polling a lease another replica holds
            pause = min(pause * 2, 0.5)
        lease = Lease()
        renewer = asyncio.create_task(self._keep(key, token, lease))
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._release(keys=[key], args=[token])
            except Exception as exc:  # it expires by itself
                log.warning("could not release a lease", extra={"lease": key, "error": repr(exc)})

    async def _keep(self, key: str, token: str, lease: Lease) -> None:
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                kept = await self._renew(keys=[key], args=[token, self.ttl_ms])
                renewed = time.monotonic()
            except Exception as exc:
                log.warning("could not renew a lease", extra={"lease": key, "error": repr(exc)})
                # It may still be ours until its time to live has passed unrenewed.
                kept = time.monotonic() - renewed < self.ttl_ms / 1000
            if not kept:
                log.error("lease lost: stopping this replica's writes", extra={"lease": key})
                lease.lost = True
                return

    async def aclose(self) -> None:
        await self._redis.aclose()
