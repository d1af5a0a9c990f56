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
from collections.abc import Awaitable

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

        try:
            await self.app(scope, receive, send_with_id)
        finally:
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
