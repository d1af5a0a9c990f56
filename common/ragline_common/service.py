"""How every ragline service is assembled and served, so the four stay alike.

`create_app` adds the error envelope, the request-id middleware, `/healthz` and the
Prometheus `/metrics` endpoint; each service adds its own routes and `/readyz`.
`serve` runs uvicorn with uvloop and httptools, with a drain phase before its graceful
shutdown (see `DrainingServer`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from uvicorn.config import STARTUP_FAILURE

from ragline_common.errors import error_response, install_error_handlers
from ragline_common.logs import configure_logging
from ragline_common.middleware import InternalErrorMiddleware, RequestContextMiddleware
from ragline_common.responses import JsonResponse
from ragline_common.settings import ServiceSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

log = logging.getLogger("ragline.service")


def create_app(title: str, lifespan: Lifespan | None = None) -> FastAPI:
    # No trailing-slash redirects: behind nginx the redirect's absolute URL can name the
    # wrong host or port, and an API client should be told the path is wrong (404), not
    # be sent somewhere else.
    app = FastAPI(
        title=title, lifespan=lifespan, default_response_class=JsonResponse, redirect_slashes=False
    )
    # True from the first SIGTERM on: /readyz answers 503 (see `DrainingServer`).
    app.state.draining = False
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)  # added first: the innermost
    Instrumentator(
        should_group_status_codes=False,
        should_exclude_streaming_duration=True,
        excluded_handlers=["/metrics", "/healthz", "/readyz"],
    ).instrument(app).expose(app, include_in_schema=False)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JsonResponse:
        """Alive unless the service says it cannot recover without a restart
        (`app.state.broken`: a reason, or empty), so a liveness probe restarts it."""
        broken = getattr(app.state, "broken", None)
        reason = broken() if callable(broken) else ""
        if reason:
            return error_response(503, "broken", reason)
        return JsonResponse({"status": "ok"})

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its graceful shutdown.

    uvicorn closes its listening socket as soon as SIGTERM arrives, so requests that a
    load balancer (a Kubernetes Service while the pod's endpoint is being removed) still
    sends here meet "connection refused". Here the first SIGTERM or SIGINT:

    1. sets `app.state.draining = True`: `/readyz` answers 503 and the gateway refuses
       new streams, while the listener stays open for `drain_s` seconds;
    2. then runs uvicorn's graceful shutdown: the listener closes, idle keep-alive
       connections close, open requests and streams get `timeout_graceful_shutdown`
       seconds to finish, whatever is left is cancelled, then the lifespan shuts down.

    A second signal forces the exit at once, as a second Ctrl-C does in uvicorn. After
    a graceful shutdown the process exits 0 (uvicorn would re-raise the signal, so the
    process would end killed by SIGTERM); a forced exit still re-raises it.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self.signalled = False
        self.drain_until: float | None = None
        self.drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags here; `on_tick`, on the loop, acts on them.
        if self.signalled:
            self._captured_signals.append(sig)
            self.should_exit = True
            self.force_exit = True
            return
        self.signalled = True
        self.app.state.draining = True
        if self.started and self.drain_s > 0:
            self.drain_until = time.monotonic() + self.drain_s
        else:  # still starting (nothing routes here yet) or no drain asked for
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s until it returns True.
        if self.drain_until is not None and not self.should_exit:
            if not self.drain_logged:
                self.drain_logged = True
                log.info(
                    "draining: readiness 503, new streams refused",
                    extra={
                        "drain_s": self.drain_s,
                        "grace_s": self.config.timeout_graceful_shutdown,
                        "open_connections": len(self.server_state.connections),
                    },
                )
            if time.monotonic() >= self.drain_until:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        started = time.monotonic()
        log.info(
            "shutting down: listener closed, open requests finishing",
            extra={
                "grace_s": self.config.timeout_graceful_shutdown,
                "open_connections": len(self.server_state.connections),
                "open_requests": len(self.server_state.tasks),
            },
        )
        grace = self.config.timeout_graceful_shutdown
        deadline = None
        if grace:
            # Just before uvicorn cancels what is left, let the app end its open streams
            # cleanly (the gateway sends an SSE `error` event) instead of cutting them.
            hooks = getattr(self.app.state, "before_grace_deadline", [])
            deadline = asyncio.get_running_loop().call_later(
                max(0.0, grace - min(1.0, grace / 4)), lambda: [hook() for hook in hooks]
            )
        try:
            await super().shutdown(sockets)
        finally:
            if deadline is not None:
                deadline.cancel()
        log.info(
            "shut down",
            extra={
                "took_s": round(time.monotonic() - started, 3),
                # Requests still running here were cancelled at the grace deadline.
                "cancelled_requests": len(self.server_state.tasks),
                "forced": self.force_exit,
            },
        )


def serve(app: FastAPI, *, service: str, settings: ServiceSettings) -> None:
    configure_logging(service, settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, app, settings.shutdown_drain_s)
    try:
        server.run()
    except KeyboardInterrupt:  # a forced exit by Ctrl-C re-raises SIGINT
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
