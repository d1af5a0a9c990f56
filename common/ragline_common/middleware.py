"""Pure ASGI middleware (never BaseHTTPMiddleware: it buffers and breaks streaming).

`RequestContextMiddleware` takes `X-Request-ID` from nginx or the caller (or makes one),
puts it in the logging context, echoes it on the response, and writes one access log line
per request with its latency.

The `send` wrappers are plain functions that return the next `send`'s awaitable rather
than coroutines that await it: a streamed answer passes every frame through each wrapper,
and a coroutine per wrapper per frame is measurable (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline_common.logs import request_id_var, tenant_var

access_log = logging.getLogger("ragline.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        tenant_token = tenant_var.set("")
        start = time.perf_counter()
        status = 0

        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            return send(message)

        def access_line() -> None:
            if scope["path"] not in _QUIET_PATHS:
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "latency_ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            slot: StreamSlot | None = scope.get(STREAM_SLOT)
            if slot is not None and slot.response is not None:
                slot.on_end = access_line  # the body streams after the chain: at its end
            else:
                access_line()
            request_id_var.reset(token)
            tenant_var.reset(tenant_token)


class InternalErrorMiddleware:
    """Turns an unhandled exception into the 500 error envelope *inside* the request-id
    middleware, so the 500 carries the request id (body, header and log line) and passes
    through every other middleware like any answer. Starlette's own catch-all runs
    outermost, where none of that is known. An exception after the response started
    cannot become a 500 any more; it goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        def tracking_send(message: Message) -> Awaitable[None]:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            return send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logging.getLogger("ragline.errors").exception("unhandled error")
            from ragline_common.errors import error_response

            response = error_response(500, "internal_error", "internal error; see the service log")
            await response(scope, receive, send)


def request_headers() -> dict[str, str]:
    """Headers to put on calls to upstream services so the request id follows the request."""
    return {"x-request-id": request_id_var.get()}


# --- a long streamed body, sent after the middleware chain has returned ----------------

# The scope key under which `StreamAfterChain` offers its `StreamSlot`.
STREAM_SLOT = "ragline.stream_slot"


class DeferredBody(Protocol):
    """A response that can stream its body outside the chain (streaming.AnswerResponse)."""

    async def stream_body(self, head: Message, send: Send, receive: Receive) -> None: ...


class StreamSlot:
    """What a deferred response leaves for `StreamAfterChain`: itself, the response head
    as the chain made it, and the access log line to write when the body has ended."""

    __slots__ = ("head", "on_end", "response")

    def __init__(self) -> None:
        self.response: DeferredBody | None = None
        self.head: Message | None = None
        self.on_end: Callable[[], None] | None = None


async def _taken() -> None:
    return None


class StreamAfterChain:
    """The outermost ASGI layer of a service whose answers stream for minutes.

    An endpoint's response normally streams from inside every layer that called it:
    FastAPI's routing (its Request objects and three AsyncExitStacks), each middleware's
    coroutine and send wrapper, and Starlette's task group around the body. For a stream
    open for minutes all of that stays alive: ~20 KiB of the gateway's ~60 KiB per open
    answer (tracemalloc over 500 streams; docs/benchmarks.md). Here a response that knows
    this layer (it finds a `StreamSlot` in the scope) only sends its head through the
    chain, which adds its headers and sees its status as always; this layer keeps the head
    instead of sending it, lets the chain return, drops what FastAPI put in the scope, and
    then has the response send the head and stream its body straight to the server.

    The access log line of such a request is written when its body ends, with the whole
    duration, as before; the HTTP metrics of prometheus-fastapi-instrumentator see the
    response when its head is sent (their duration is the time to the head).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = tuple(scope)
        slot = StreamSlot()
        scope[STREAM_SLOT] = slot

        def chain_send(message: Message) -> Awaitable[None]:
            if slot.response is not None and slot.head is None:
                slot.head = message  # kept: sent once the chain has returned
                return _taken()
            return send(message)

        await self.app(scope, receive, chain_send)
        response, head, on_end = slot.response, slot.head, slot.on_end
        if response is None or head is None:
            return
        for key in [k for k in scope if k not in own]:
            del scope[key]  # FastAPI's exit stacks, route and endpoint: not needed now
        slot.response = slot.head = slot.on_end = None
        try:
            await response.stream_body(head, send, receive)
        finally:
            if on_end is not None:
                on_end()
