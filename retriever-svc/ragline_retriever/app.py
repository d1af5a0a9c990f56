"""Assembles the retriever app: shared service wiring, our routes, and a lifespan that
opens everything before the first request, so readiness means ready."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from ragline_common.service import create_app
from ragline_retriever.api import router
from ragline_retriever.limits import BodyLimitMiddleware
from ragline_retriever.runtime import Runtime
from ragline_retriever.settings import RetrieverSettings


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
    return app
