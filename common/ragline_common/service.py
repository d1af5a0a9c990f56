"""How every ragline service is assembled and served, so the four stay alike.

`create_app` adds the error envelope, the request-id middleware, `/healthz` and the
Prometheus `/metrics` endpoint; each service adds its own routes and `/readyz`.
`serve` runs uvicorn with uvloop and httptools.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import uvicorn
from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator

from ragline_common.errors import install_error_handlers
from ragline_common.logs import configure_logging
from ragline_common.middleware import RequestContextMiddleware
from ragline_common.responses import JsonResponse
from ragline_common.settings import ServiceSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(title: str, lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(title=title, lifespan=lifespan, default_response_class=JsonResponse)
    install_error_handlers(app)
    Instrumentator(
        should_group_status_codes=False,
        should_exclude_streaming_duration=True,
        excluded_handlers=["/metrics", "/healthz", "/readyz"],
    ).instrument(app).expose(app, include_in_schema=False)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(app: FastAPI, *, service: str, settings: ServiceSettings) -> None:
    configure_logging(service, settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
