"""How every ragline service is assembled and served, so the four stay alike.

`create_app` adds the error envelope, the request-id middleware, `/healthz` and the
Prometheus `/metrics` endpoint (and, given a service token, the check of internal
callers: ragline_common.service_token); each service adds its own routes and `/readyz`.
`serve` runs uvicorn with uvloop and httptools, with a drain phase before its graceful
shutdown (see `DrainingServer`), and moves `/metrics` to a port of its own when
`METRICS_PORT` is set (see `MetricsServer`).
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
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import SecretStr
from starlette.routing import BaseRoute
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE

from ragline_common.errors import error_response, install_error_handlers
from ragline_common.logs import configure_logging
from ragline_common.middleware import InternalErrorMiddleware, RequestContextMiddleware
from ragline_common.responses import JsonResponse
from ragline_common.service_token import ServiceTokenMiddleware, service_tokens
from ragline_common.settings import ServiceSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

log = logging.getLogger("ragline.service")


METRICS_PATH = "/metrics"


def create_app(
    title: str, lifespan: Lifespan | None = None, *, service_token: SecretStr | str = ""
) -> FastAPI:
    """`service_token` (the internal services' SERVICE_TOKEN setting; never the gateway's,
    whose public API has its API keys): when set, every request but /healthz and /readyz
    must carry it (ragline_common.service_token)."""
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
    tokens = service_tokens(service_token)
    if tokens:
        # Inside the request-id middleware (its 401 carries the request id) and the
        # instrumentator (refusals are counted), outside everything that reads a body.
        app.add_middleware(ServiceTokenMiddleware, tokens=tokens)
    Instrumentator(
        should_group_status_codes=False,
        should_exclude_streaming_duration=True,
        excluded_handlers=[METRICS_PATH, "/healthz", "/readyz"],
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
        # /metrics on a port of its own (METRICS_PORT), served alongside; None: on ours.
        self.metrics: MetricsServer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Metrics first: they answer while the lifespan loads models (the pod is up, not
        # ready), and a taken metrics port stops the start before anything loads.
        if self.metrics is not None:
            await self.metrics.start()
        await super().startup(sockets)

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
            # Scrapes go on through the drain and grace: closed last.
            if self.metrics is not None:
                await self.metrics.stop()
        log.info(
            "shut down",
            extra={
                "took_s": round(time.monotonic() - started, 3),
                # Requests still running here were cancelled at the grace deadline.
                "cancelled_requests": len(self.server_state.tasks),
                "forced": self.force_exit,
            },
        )


def split_metrics(app: FastAPI) -> FastAPI:
    """Takes `/metrics` off `app` (its port answers 404 there from now on) and returns an
    app that serves only that route, the same handler (the same registry and exposition)."""
    found: list[BaseRoute] = [
        r for r in app.router.routes if getattr(r, "path", None) == METRICS_PATH
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one {METRICS_PATH} route, found {len(found)}")
    app.router.routes.remove(found[0])
    metrics_app = FastAPI(
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        default_response_class=JsonResponse,
        redirect_slashes=False,
    )
    install_error_handlers(metrics_app)
    metrics_app.router.routes.append(found[0])
    return metrics_app


class MetricsServer:
    """`/metrics` on a port of its own (METRICS_PORT): a second uvicorn server in the
    service's own event loop, started and stopped by `DrainingServer`.

    In the same loop, not a thread: a service whose loop is stuck stops answering scrapes
    as it would on its main port, which is what the target-down alert relies on
    (docs/observing.md). Only metrics are reachable on that port, so a network policy can
    open it to Prometheus without opening the API (and without the service token)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)

    async def start(self) -> None:
        """Listens; a port that cannot be bound ends the process (uvicorn logs why)."""
        config = self.server.config
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup()

    async def stop(self) -> None:
        if self.server.started:
            await self.server.shutdown()


def serve(
    app: FastAPI,
    *,
    service: str,
    settings: ServiceSettings,
    outer: Callable[[ASGIApp], ASGIApp] | None = None,
    **options: Any,
) -> None:
    """`outer`: a layer around the app, outside its middleware (the gateway's:
    StreamAfterChain). `options`: uvicorn.Config settings over these (the gateway's: an
    HTTP protocol that bounds request heads, and the proxies whose X-Forwarded-For it
    believes)."""
    configure_logging(service, settings.log_level)
    config = uvicorn.Config(
        app if outer is None else outer(app),
        **{
            "host": settings.host,
            "port": settings.port,
            "loop": "uvloop",
            "http": "httptools",
            "log_config": None,
            "log_level": settings.log_level,
            "access_log": False,
            "timeout_graceful_shutdown": settings.shutdown_grace_s,
            **options,
        },
    )
    server = DrainingServer(config, app, settings.shutdown_drain_s)
    if settings.metrics_port:
        server.metrics = MetricsServer(split_metrics(app), settings.host, settings.metrics_port)
    try:
        server.run()
    except KeyboardInterrupt:  # a forced exit by Ctrl-C re-raises SIGINT
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
