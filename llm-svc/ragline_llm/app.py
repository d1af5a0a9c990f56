"""llm-svc application: starts the engine before it reports ready."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ragline_common.service import create_app
from ragline_llm.api_router import router
from ragline_llm.engines import build_engine
from ragline_llm.serving import ChatServing
from ragline_llm.settings import LlmSettings

log = logging.getLogger("ragline.llm")


def build_app(settings: LlmSettings | None = None) -> FastAPI:
    settings = settings or LlmSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = build_engine(settings)
        await engine.start()
        app.state.serving = ChatServing(engine, settings)
        # A dead engine fails /healthz too, so the liveness probe restarts the pod.
        app.state.broken = lambda: "the generation engine died; restart" if engine.dead else ""
        log.info("llm engine ready", extra={"engine": engine.name, "model": engine.model_name})
        try:
            yield
        finally:
            await engine.close()

    app = create_app("ragline llm-svc", lifespan, service_token=settings.service_token)
    app.state.serving = None
    app.include_router(router)
    return app
