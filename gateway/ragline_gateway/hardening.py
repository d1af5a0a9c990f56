"""What makes the gateway safe to face the internet directly, not only behind nginx:
a CORS allow-list and security headers on every response.

All pure ASGI (never BaseHTTPMiddleware, which buffers streams), with `send` wrappers
that return the next `send`'s awaitable instead of awaiting it (why:
ragline_common.middleware).
"""

from __future__ import annotations

from collections.abc import Awaitable

import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline_common.errors import error_body
from ragline_gateway.settings import GatewaySettings

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
