"""What makes the gateway safe to face the internet directly, not only behind nginx:
a CORS allow-list, security headers on every response, and bounded request headers.

All pure ASGI (never BaseHTTPMiddleware, which buffers streams), with `send` wrappers
that return the next `send`'s awaitable instead of awaiting it (why:
ragline_common.middleware).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable

import httptools
import orjson
from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ragline_common.errors import ApiError, error_body
from ragline_gateway.settings import GatewaySettings

log = logging.getLogger("ragline.hardening")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    # An API answers JSON and event streams; nothing in them may load or run anything.
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            return send(message)

        await self.app(scope, receive, send_with_headers)


class PayloadTooLargeEnvelope:
    """Starlette's body limit answers a declared Content-Length over the limit with its own
    text/plain 413, in place of whatever the app answered: give that one the envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_instead(message: Message) -> None:
            headers = message.get("headers", [])
            body = orjson.dumps(error_body("payload_too_large", "the request body is too large"))
            kept = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
            kept += [(b"content-type", b"application/json"),
                     (b"content-length", str(len(body)).encode())]  # fmt: skip
            await send({**message, "headers": kept})
            await send({"type": "http.response.body", "body": body})

        def send_envelope(message: Message) -> Awaitable[None]:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                headers = message.get("headers", [])
                if not any(k == b"content-type" and v.startswith(b"application/json")
                           for k, v in headers):  # fmt: skip
                    replaced = True
                    return send_instead(message)
            return _dropped() if replaced else send(message)

        await self.app(scope, receive, send_envelope)


async def _dropped() -> None:
    """What the rest of a replaced response is sent to."""


def no_control_characters(request: Request) -> None:
    """A router dependency: a path with a control character (`%0A`, `%00`, ...) is refused.
    No collection, document or job id may hold one, and Starlette's router would not say
    so: its `{name:path}` parameters match with `.*` and `$`, so `/documents/d%0A` routes
    as the document `d`, the newline dropped (a DELETE of another document than named)."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in request.scope["path"]):
        raise ApiError(400, "invalid_path", "the path holds a control character")


def install_hardening(app: FastAPI, settings: GatewaySettings) -> None:
    """Body limits are per router (app.py: FastAPI's `max_body_size`, a 413 before the
    body is read past the limit, chunked or not)."""
    app.add_middleware(PayloadTooLargeEnvelope)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after", "location"],
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware)


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded request heads.

    httptools (llhttp) and uvicorn put no bound on the request line and headers: an 8 MB
    header, or 2,000 headers, are read into memory whole and reach the app (measured with
    uvicorn 0.55, httptools 0.9; h11's own bound answers a plain-text 400, not a 431).
    Here the head may hold at most `max_header_bytes` (request line and headers, counted
    as they arrive, before the head is complete) and `max_header_count` header lines.
    Over either, the request never reaches the app: the client gets 431 with the JSON
    error envelope (and a request id, X-Request-ID, the security headers) and
    `Connection: close`. The connection then reads and drops what the client still sends
    for up to `linger_s` (or `linger_bytes`) before it closes, so that a client still
    writing its oversized head reads the 431 instead of a connection reset.

    Set the limits with `configured`; `serve` (ragline_common.service) runs uvicorn with
    the returned class as its HTTP protocol.
    """

    # Slots: six more attributes in the instance dict would take uvicorn's protocol past
    # CPython's shared-key dict limit, 296 bytes to 1.5 KiB per connection.
    __slots__ = ("_dropped", "_head_bytes", "_head_open", "_linger", "_messages", "_refusal")

    max_header_bytes = 64 * 1024
    max_header_count = 100
    linger_s = 2.0
    linger_bytes = 64 * 1024 * 1024

    @classmethod
    def configured(cls, max_bytes: int, max_count: int) -> type[HeaderLimitedProtocol]:
        limits = {"__slots__": (), "max_header_bytes": max_bytes, "max_header_count": max_count}
        return type(cls.__name__, (cls,), limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_open = True  # between requests or inside a head: head bytes count
        self._head_bytes = 0  # of the head now arriving, counted before it is complete
        self._messages = 0
        self._refusal: str | None = None  # why the head is refused, once it is
        self._dropped = 0
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # refused: reading only to let the 431 arrive
            self._dropped += len(data)
            if self._dropped > self.linger_bytes:
                self.transport.close()
            return
        head_open, messages = self._head_open, self._messages
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is None:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            else:
                self._refuse()
            return
        # Bytes of a head still incomplete; a read that also finished an earlier request
        # is not counted (it may hold that request's body): at most one read is missed.
        if self._head_open and head_open and messages == self._messages:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refusal = "the request headers are too large"
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_header_bytes:
            self._refusal = "the request line is too long"
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_header_count:
            self._refusal = f"more than {self.max_header_count} request headers"
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.max_header_bytes:
            self._refusal = "the request headers are too large"
            raise _HeadTooLarge
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._messages += 1
        self._head_open = True
        self._head_bytes = 0
        super().on_message_complete()

    def _refuse(self) -> None:
        """The 431, unless an earlier request's answer is still being written on this
        connection (pipelined): then the connection is only closed."""
        self._unset_keepalive_if_required()
        limits = {"max_bytes": self.max_header_bytes, "max_headers": self.max_header_count}
        log.warning("request head refused", extra={"reason": self._refusal, **limits})
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        request_id = uuid.uuid4().hex
        message = (
            f"{self._refusal} (at most {self.max_header_count} headers, "
            f"{self.max_header_bytes} bytes in all)"
        )
        error = {"code": "request_header_fields_too_large", "message": message,
                 "request_id": request_id}  # fmt: skip
        body = orjson.dumps({"error": error})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
            *SECURITY_HEADERS,
        ]
        head = b"HTTP/1.1 431 Request Header Fields Too Large\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        self.transport.write(head + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(self.linger_s, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the limits."""
