"""Assembles the retriever app: shared service wiring, our routes, and a lifespan that
opens everything before the first request, so readiness means ready."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from starlette.middleware import Middleware

from ragline_common.errors import error_response
from ragline_common.responses import JsonResponse
from ragline_common.service import create_app
from ragline_retriever.api import router
from ragline_retriever.limits import BodyLimitMiddleware
from ragline_retriever.runtime import Runtime
from ragline_retriever.settings import RetrieverSettings

log = logging.getLogger("ragline.retriever")


def build_app(settings: RetrieverSettings | None = None) -> FastAPI:
    settings = settings or RetrieverSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = Runtime(settings)
        app.state.runtime = rt
        try:
            await rt.open()
            yield
        finally:
            await rt.close()

    app = create_app(
        "ragline retriever-svc", lifespan=lifespan, service_token=settings.service_token
    )
    # Appended, not `add_middleware` (which wraps outermost): inside the request-id
    # middleware, so a refused body still gets a request id in its envelope and log line.
    app.user_middleware.append(Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes))
    app.include_router(router)

    @app.exception_handler(redis.RedisError)
    async def _write_log_down(_: Request, exc: redis.RedisError) -> JsonResponse:
        """The shared write log (Redis) is unreachable: writes, jobs and index versions
        wait for it (a 503 to retry), searches go on (they do not touch it)."""
        log.warning("write log unavailable", extra={"error": repr(exc)[:500]})
        return error_response(
            503,
            "write_log_unavailable",
            "the write log (Redis) is unavailable; try again shortly",
            {"Retry-After": "5"},
        )

    return app
