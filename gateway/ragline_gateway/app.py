"""Gateway app: builds the upstream clients, memory and pipeline once for the process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ragline_common.service import create_app
from ragline_gateway.admission import Admission
from ragline_gateway.api_router import router
from ragline_gateway.clients.llm import LlmClient
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.clients.retriever import RetrieverClient
from ragline_gateway.documents import router as documents_router
from ragline_gateway.memory import ConversationMemory, LocalMemory, RedisMemory
from ragline_gateway.pipeline import AnswerPipeline
from ragline_gateway.settings import GatewaySettings

log = logging.getLogger("ragline.gateway")


def build_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = settings.upstream_pool_size
        retriever = RetrieverClient(settings.retriever_url, pool)
        reranker = RerankerClient.from_settings(settings, pool)
        llm = LlmClient(settings.llm_url, pool, connect_timeout=settings.llm_connect_timeout_s)
        memory: ConversationMemory = (
            RedisMemory(settings.redis_url, settings.history_ttl_s, settings.memory_timeout_s)
            if settings.redis_url
            else LocalMemory()
        )
        app.state.settings = settings
        app.state.retriever, app.state.reranker, app.state.llm = retriever, reranker, llm
        app.state.pipeline = AnswerPipeline(settings, retriever, reranker, llm, memory)
        app.state.admission = Admission(settings.max_inflight_streams)
        app.state.draining = False
        log.info(
            "gateway started", extra={"retriever": settings.retriever_url, "llm": settings.llm_url}
        )
        try:
            yield
        finally:
            app.state.draining = True
            for client in (retriever, reranker, llm):
                await client.aclose()
            await memory.aclose()

    app = create_app("ragline gateway", lifespan)
    app.include_router(router)
    app.include_router(documents_router)
    return app
