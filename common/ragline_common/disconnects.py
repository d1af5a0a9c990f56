"""Work that stops when its client leaves.

Starlette does not cancel a handler whose client has gone. A streamed answer notices when
a frame cannot be sent, but a non-streamed one sends nothing until the end (and a stream
waiting for its first token sends nothing yet): without this it would generate, and hold
its slot, to the last token for nobody. Cancelling the work closes whatever upstream or
engine stream it holds, which aborts the generation there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone. Call it once the body has been read: then the
    next message from the server is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has gone, `work` being cancelled then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()
