"""An answer's body streams after the middleware chain has returned (StreamAfterChain in
ragline_common.middleware, AnswerResponse in the gateway's streaming.py): what each open
stream holds is then the response and its body, not the chain's coroutines, Requests and
exit stacks (~20 KiB of ~60 per open answer, docs/benchmarks.md).

In-process, on a small FastAPI app with the real middleware, because what is checked is
ASGI order (the chain has returned while the body is still open; the head carries what
the chain added; a client that leaves ends the stream and releases it; the access log
line comes at the end). The gateway's own process serves this way in every test that
streams an answer from it (tests/test_gateway_upstream_faults.py: a client that leaves
aborts its generation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from ragline_common.middleware import RequestContextMiddleware, StreamAfterChain
from ragline_gateway.streaming import AnswerResponse

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/answer",
    "raw_path": b"/answer",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"x-request-id", b"req-after-chain")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


class Rig:
    """The app: one streamed route behind the request-context middleware and a middleware
    that notes when its call returns; the body waits for `go` between its two chunks."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.chain_returned = False
        self.closed = 0
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.first_chunk = asyncio.Event()
        app = FastAPI()

        @app.get("/answer")
        async def answer() -> AnswerResponse:
            async def body() -> AsyncIterator[bytes]:
                yield b"event: token\ndata: 1\n\n"
                await self.go.wait()
                yield b"event: done\ndata: {}\n\n"

            async def on_close() -> None:
                self.closed += 1

            return AnswerResponse(body(), on_close)

        rig = self

        class NotesReturn:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await self.inner(scope, receive, send)
                rig.chain_returned = True

        app.add_middleware(NotesReturn)
        app.add_middleware(RequestContextMiddleware)
        self.app = StreamAfterChain(app)

    async def receive(self) -> dict[str, Any]:
        if not hasattr(self, "_asked"):
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.first_chunk.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    async def until_first_chunk(self) -> None:
        await asyncio.wait_for(self.first_chunk.wait(), 5)
        assert len(self.bodies()) == 1


def test_the_chain_has_returned_while_the_body_streams(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        rig = Rig()
        with caplog.at_level(logging.INFO, logger="ragline.access"):
            served = asyncio.create_task(rig.app(dict(SCOPE), rig.receive, rig.send))
            await rig.until_first_chunk()
            assert rig.chain_returned  # the middleware's call is over, the body is not
            head = rig.sent[0]
            assert head["type"] == "http.response.start" and head["status"] == 200
            # What the chain added to the head is there: the request id.
            assert (b"x-request-id", b"req-after-chain") in head["headers"]
            assert not [r for r in caplog.records if r.name == "ragline.access"]
            rig.go.set()
            await asyncio.wait_for(served, 5)
        assert rig.bodies() == [b"event: token\ndata: 1\n\n", b"event: done\ndata: {}\n\n", b""]
        assert rig.sent[-1]["more_body"] is False
        assert rig.closed == 1
        # One access line, written at the end of the body, with the answer's request id.
        lines = [r for r in caplog.records if r.name == "ragline.access"]
        assert len(lines) == 1
        assert lines[0].path == "/answer" and lines[0].status == 200  # type: ignore[attr-defined]

    asyncio.run(run())


def test_a_client_that_leaves_ends_the_stream_and_releases_it() -> None:
    async def run() -> None:
        rig = Rig()
        served = asyncio.create_task(rig.app(dict(SCOPE), rig.receive, rig.send))
        await rig.until_first_chunk()
        rig.gone.set()  # the client leaves while the body waits for its next chunk
        await asyncio.wait_for(served, 5)  # ends, without an error
        assert rig.closed == 1
        assert rig.bodies() == [b"event: token\ndata: 1\n\n"]  # nothing after it

    asyncio.run(run())


def test_without_the_outer_layer_the_response_streams_inside_the_chain() -> None:
    """An app called directly (tests with an ASGI transport) streams as Starlette does."""

    async def run() -> None:
        rig = Rig()
        inner = rig.app.app
        served = asyncio.create_task(inner(dict(SCOPE), rig.receive, rig.send))
        await rig.until_first_chunk()
        assert not rig.chain_returned
        rig.go.set()
        await asyncio.wait_for(served, 5)
        assert rig.chain_returned and rig.closed == 1
        assert rig.bodies()[-1] == b""

    asyncio.run(run())
