"""Rendering pipeline events on the wire: native SSE (`/api/chat`) and OpenAI chunks
(`/v1/chat/completions`), plus the response class both use.

Per-token work is kept to one orjson call and a bytes join: the prefix and suffix of an
OpenAI token chunk are built once per answer.

An OpenAI answer from the knowledge base carries its passages three ways: `sources` on
the first chunk (all of them, for clients that know ragline), `url_citation` annotations
in a chunk after the last token, once the content they point into is complete
(citations.py), and, for Open WebUI, `source` events before the text (openwebui.py; then
no annotations). An answer without the knowledge base carries none of them.

An answer from the knowledge base goes through `citations.CitationFilter` on its way out:
a citation of a source that does not exist ("[7]" of three) never reaches the client, on
either endpoint, streamed or not, live or from the cache (see citations.py for why it is
dropped). Text without such a marker is relayed as it comes; only a tail that may still
become one ("[", "[1", a space before it) waits for the next token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from ragline_common.errors import ApiError
from ragline_common.logs import request_id_var, tenant_var
from ragline_common.middleware import STREAM_SLOT, StreamSlot
from ragline_gateway.citations import CitationFilter, drop_unknown_citations, url_citations
from ragline_gateway.openwebui import source_event
from ragline_gateway.pipeline import Event, PreparedAnswer

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"


class AnswerResponse(StreamingResponse):
    """A streaming response that always runs `on_close`, even when the client left before
    the body was started (the upstream stream and the admission ticket are released).

    Served behind `StreamAfterChain` (ragline_common.middleware; the gateway's process
    is), it sends only its head through the middleware chain and streams its body once
    the chain has returned (`stream_body`), so that an open answer does not hold the
    chain's objects. Elsewhere (an app called directly) it streams as Starlette's does.
    """

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close
        self._context = ("", "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slot: StreamSlot | None = scope.get(STREAM_SLOT)
        if slot is None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.on_close()
            return
        slot.response = self
        self._context = (request_id_var.get(), tenant_var.get())
        head = {"type": "http.response.start", "status": self.status_code,
                "headers": self.raw_headers}  # fmt: skip
        try:
            await send(head)  # through the chain, which adds its headers; kept by the slot
        except BaseException:
            slot.response = None
            with anyio.CancelScope(shield=True):
                await self.on_close()
            raise

    async def stream_body(self, head: Message, send: Send, receive: Receive) -> None:
        """The head and the body, straight to the server. A client that leaves cancels
        the stream (its generation is aborted by `on_close`), as Starlette's task group
        does, here with one listener task and no task group."""
        request_id_var.set(self._context[0])  # for the log lines of the answer's end
        tenant_var.set(self._context[1])
        task = asyncio.current_task()
        assert task is not None
        gone = streaming = False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            if streaming:  # else the body has ended: nothing left to stop
                task.cancel()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            streaming = True
            try:
                await send(head)
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                streaming = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: this request ends normally
        finally:
            listener.cancel()
            with anyio.CancelScope(shield=True):
                await self.on_close()


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _token(text: str) -> bytes:
    return b"event: token\ndata: " + orjson.dumps({"text": text}) + b"\n\n"


async def native_sse(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """`/api/chat` (always the knowledge base): the citation filter is set up from the
    `sources` event, which comes before the first token."""
    citations: CitationFilter | None = None
    async for name, payload in events:
        if name == "token":
            text = citations.feed(payload) if citations is not None else payload
            if text:
                yield _token(text)
        elif name == "ping":
            yield PING
        else:
            if name == "sources":
                citations = CitationFilter(s["n"] for s in payload["sources"])
            elif citations is not None and (held := citations.flush()):  # done or error
                yield _token(held)
            yield sse(name, payload)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


class OpenAIChunks:
    """Renders one answer as `chat.completion.chunk` SSE frames; `source_events`: the
    passages also as Open WebUI `source` events, instead of annotations."""

    def __init__(
        self, p: PreparedAnswer, model: str, include_usage: bool, source_events: bool = False
    ) -> None:
        self.p = p
        self.model = model
        self.include_usage = include_usage
        self.source_events = source_events and p.question.knowledge_base
        # The content is kept only where annotations will point into it.
        self._parts: list[str] | None = (
            [] if p.question.knowledge_base and p.sources and not self.source_events else None
        )
        self.citations = (
            CitationFilter(s.n for s in p.sources) if p.question.knowledge_base else None
        )
        self.id = completion_id()
        self.created = int(time.time())
        head = orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": model,
            }
        )
        self._token_prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self._token_suffix = b'},"finish_reason":null}]}\n\n'

    def _token(self, text: str) -> bytes:
        if self._parts is not None:
            self._parts.append(text)
            if len(self._parts) == 64:  # one string, not a string object per token
                self._parts[:] = ["".join(self._parts)]
        return self._token_prefix + orjson.dumps(text) + self._token_suffix

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, **extra}  # fmt: skip
        return b"data: " + orjson.dumps(body) + b"\n\n"

    async def render(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        async for name, payload in events:
            if name == "token":
                text = self.citations.feed(payload) if self.citations is not None else payload
                if text:
                    yield self._token(text)
                continue
            if name in ("done", "error") and self.citations is not None:
                held = self.citations.flush()
                if held:
                    yield self._token(held)
            if name == "sources":
                delta = {"role": "assistant", "content": ""}
                extra = (
                    {"sources": payload["sources"], "conversation_id": self.p.conversation_id}
                    if self.p.question.knowledge_base
                    else {}
                )
                yield self._frame([{"index": 0, "delta": delta, "finish_reason": None}], **extra)
                if self.source_events:
                    for source in self.p.sources:
                        yield self._frame([], event=source_event(source))
            elif name == "ping":
                yield PING
            elif name == "done":
                annotations = (
                    url_citations(self.p.sources, "".join(self._parts)) if self._parts else []
                )
                if annotations:
                    delta = {"annotations": annotations}
                    yield self._frame([{"index": 0, "delta": delta, "finish_reason": None}])
                yield self._frame(
                    [{"index": 0, "delta": {}, "finish_reason": payload["finish_reason"]}],
                    ragline={k: payload[k] for k in ("degraded", "timings", "cached")},
                )
                if self.include_usage:
                    yield self._frame([], usage=payload["usage"] or None)
                yield b"data: [DONE]\n\n"
            elif name == "error":
                yield (
                    b"data: "
                    + orjson.dumps({"error": {**payload, "type": "server_error"}})
                    + b"\n\n"
                )


async def openai_completion(
    p: PreparedAnswer, model: str, events: AsyncIterator[Event]
) -> dict[str, Any]:
    """The non-streamed OpenAI response; an upstream failure mid-answer raises ApiError
    (503 with Retry-After). Without the knowledge base: no annotations, no sources."""
    parts: list[str] = []
    done: dict[str, Any] = {}
    async for name, payload in events:
        if name == "token":
            parts.append(payload)
        elif name == "done":
            done = payload
        elif name == "error":
            # Nothing was sent yet: the client gets what a dependency failure gets, a 503
            # it may retry (OpenAI SDKs do), not a 502 that reads as a broken gateway.
            raise ApiError(503, payload["code"], payload["message"], {"Retry-After": "5"})
    content = "".join(parts)
    if p.question.knowledge_base:
        content = drop_unknown_citations(content, (s.n for s in p.sources))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    knowledge: dict[str, Any] = {}
    if p.question.knowledge_base:
        message["annotations"] = url_citations(p.sources, content)
        knowledge = {
            "sources": [s.as_dict() for s in p.sources],
            "conversation_id": p.conversation_id,
        }
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": done.get("finish_reason", "stop")}
        ],
        "usage": done.get("usage") or None,
        **knowledge,
        "ragline": {k: done.get(k) for k in ("degraded", "timings", "cached")},
    }
