"""reranker-svc application: loads the scorer before it reports ready."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ragline_common.service import create_app
from ragline_reranker.api import RerankerState, router
from ragline_reranker.batching import MicroBatcher
from ragline_reranker.scorers import build_scorer
from ragline_reranker.settings import RerankerSettings

log = logging.getLogger("ragline.reranker")


def build_app(settings: RerankerSettings | None = None) -> FastAPI:
    settings = settings or RerankerSettings()
    state = RerankerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scorer, warning = await asyncio.to_thread(build_scorer, settings)
        if warning:
            log.warning(warning, extra={"scorer": scorer.kind, "model": scorer.model_name})
        batcher = MicroBatcher(
            scorer,
            max_batch_tokens=scorer.max_batch_tokens,
            max_batch_pairs=settings.max_batch_pairs,
            max_queue_pairs=settings.max_queue_pairs,
            max_wait_ms=settings.max_wait_ms,
        )
        batcher.start()
        state.scorer, state.batcher, state.warning = scorer, batcher, warning
        state.ready = True
        log.info(
            "reranker ready",
            extra={
                "scorer": scorer.kind,
                "model": scorer.model_name,
                "device": scorer.device,
                "dtype": str(scorer.dtype).removeprefix("torch."),
                "max_length": scorer.max_length,
                "tokenize_once": scorer.tokenize_once,
                "max_batch_tokens": scorer.max_batch_tokens,
                "max_wait_ms": settings.max_wait_ms,
            },
        )
        try:
            yield
        finally:
            state.ready = False
            await batcher.close()

    app = create_app("ragline reranker-svc", lifespan, service_token=settings.service_token)
    app.state.reranker = state
    app.include_router(router)
    return app
