"""How the task reading llm-svc's stream hands an answer's tokens to the task writing it.

A bounded queue that also notices silence: once `quiet_after` seconds pass with nothing to
take, `get` returns QUIET (the answer sends `: ping` or gives up on an idle generator).
The reader task exists so that this waiting never cancels a read inside httpx's stream.

Not `asyncio.Queue` with a timeout around each `get`: both are paid once per token for
every open answer. Here a token costs a list append and pop and, when the writer is
waiting, one future; the silence check is one timer per answer that fires only every
`quiet_after` seconds. (On Python 3.11 `asyncio.Queue` also looks up the running loop on
each wait, which is a getpid() system call; docs/benchmarks.md has the profile.)
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Quiet:
    """What `get` returns when nothing came for `quiet_after` seconds."""


QUIET = Quiet()


class Feed(Generic[T]):
    """One producer, one consumer, and callbacks that may add an item (`put_nowait`)."""

    def __init__(self, maxsize: int, quiet_after: float) -> None:
        self._loop = asyncio.get_running_loop()
        # A list, not a deque: it holds a token or two at a time (up to `maxsize` when
        # the writer falls behind), and an empty deque is a 760-byte block per stream.
        self._items: list[T | Quiet] = []
        self._maxsize = maxsize
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._quiet_after = quiet_after
        self._taken_at = self._loop.time()
        self._timer = self._loop.call_later(quiet_after, self._check_quiet)

    def put_nowait(self, item: T | Quiet) -> bool:
        """False, and the item dropped, when the feed is full."""
        if len(self._items) >= self._maxsize:
            return False
        self._items.append(item)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        return True

    async def put(self, item: T) -> None:
        while len(self._items) >= self._maxsize:  # the writer is behind: wait for it
            self._putter = self._loop.create_future()
            await self._putter
        self.put_nowait(item)

    async def get(self) -> T | Quiet:
        while not self._items:
            self._getter = self._loop.create_future()
            await self._getter
        self._taken_at = self._loop.time()
        if self._putter is not None and not self._putter.done():
            self._putter.set_result(None)
        return self._items.pop(0)

    def take_ready(self, kind: type[T]) -> list[T]:
        """The items of type `kind` at the head of the feed, taken without waiting: those
        the producer added while the consumer was busy (an end or an error behind them
        stays for `get`)."""
        items = self._items
        taken: list[T] = []
        while items and type(items[0]) is kind:
            taken.append(items.pop(0))  # type: ignore[arg-type]
        if taken and self._putter is not None and not self._putter.done():
            self._putter.set_result(None)
        return taken

    def close(self) -> None:
        self._timer.cancel()

    def _check_quiet(self) -> None:
        quiet = self._loop.time() - self._taken_at
        if quiet >= self._quiet_after:
            self.put_nowait(QUIET)
            self._taken_at, quiet = self._loop.time(), 0.0
        self._timer = self._loop.call_later(self._quiet_after - quiet, self._check_quiet)
