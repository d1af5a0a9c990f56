"""Gateway app: builds the upstream clients, Redis-backed state and the pipeline once for
the process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis
from fastapi import Depends, FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ragline_common.service import create_app
from ragline_common.service_token import token_to_send
from ragline_gateway.admission import Admission
from ragline_gateway.api_router import router
from ragline_gateway.auth import Authenticator, FailedAuthThrottle, check_trusted_proxies
from ragline_gateway.cache import AnswerCache, LocalCache, RedisCache
from ragline_gateway.clients.llm import LlmClient
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.clients.retriever import RetrieverClient
from ragline_gateway.documents import router as documents_router
from ragline_gateway.hardening import install_hardening, no_control_characters
from ragline_gateway.limits import Limiter, LocalLimiter, RedisLimiter
from ragline_gateway.memory import ConversationMemory, LocalMemory, RedisMemory
from ragline_gateway.pipeline import AnswerPipeline
from ragline_gateway.settings import GatewaySettings

log = logging.getLogger("ragline.gateway")


def redis_client(settings: GatewaySettings) -> redis.Redis:
    """One pool for cache, limits and memory. Short timeouts and a single retry: a pooled
    connection that died with a Redis restart is retried once on a fresh one, while a Redis
    that is down costs each request one quick failure, not a backoff loop."""
    return redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def build_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    # Built here, not in the lifespan: bad keys must stop the process before it listens.
    auth = Authenticator(
        keys_file=settings.api_keys_file,
        keys_json=settings.api_keys.get_secret_value(),
        allow_anonymous=settings.allow_anonymous,
        default_collection=settings.default_collection,
        requests_per_minute=settings.requests_per_minute,
        max_streams=settings.max_streams_per_key,
    )
    check_trusted_proxies(settings.trusted_proxies)  # used by uvicorn (__main__.py)
    throttle = FailedAuthThrottle(settings.auth_failure_limit, settings.auth_failure_window_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = settings.upstream_pool_size
        retriever = RetrieverClient(
            settings.retriever_url, pool, upstream_http=settings.upstream_http
        )
        reranker = RerankerClient.from_settings(settings, pool)
        llm = LlmClient.from_settings(settings, pool)
        # The internal hops' shared secret, on every call to the three (clients/base.py).
        for client in (retriever, reranker, llm):
            client.send_service_token(token_to_send(settings.service_token))
        shared = redis_client(settings) if settings.redis_url else None
        memory: ConversationMemory
        limiter: Limiter
        cache: AnswerCache | None
        if shared is not None:
            memory = RedisMemory(shared, settings.history_ttl_s)
            limiter = RedisLimiter(
                shared,
                on_redis_error=settings.rate_limit_on_redis_error,
                lease_ttl_s=settings.stream_lease_ttl_s,
            )
            cache = RedisCache(shared, settings.cache_ttl_s)
        else:
            memory, limiter, cache = LocalMemory(), LocalLimiter(), LocalCache(settings.cache_ttl_s)
        if not settings.cache_ttl_s:
            cache = None
        app.state.settings = settings
        app.state.retriever, app.state.reranker, app.state.llm = retriever, reranker, llm
        app.state.pipeline = AnswerPipeline(settings, retriever, reranker, llm, memory, cache)
        app.state.before_grace_deadline = [app.state.pipeline.end_open_streams]
        app.state.draining = False
        app.state.admission = Admission(
            auth,
            limiter,
            settings.max_inflight_streams,
            app.state,
            throttle=throttle,
            call_rate_multiplier=settings.call_rate_multiplier,
        )
        watchers = [asyncio.create_task(auth.watch(settings.keys_reload_interval_s))]
        if settings.upstream_probe_interval_s:
            watchers += [
                asyncio.create_task(
                    client.watch(
                        settings.upstream_probe_interval_s,
                        settings.upstream_probe_timeout_s,
                        settings.upstream_down_after,
                    )
                )
                for client in (retriever, reranker, llm)
            ]
        log.info(
            "gateway started", extra={"retriever": settings.retriever_url, "llm": settings.llm_url}
        )
        try:
            yield
        finally:
            app.state.draining = True
            for watcher in watchers:
                watcher.cancel()
            for client in (retriever, reranker, llm):
                await client.aclose()
            await memory.aclose()
            await limiter.aclose()
            if shared is not None:
                await shared.aclose()

    app = create_app("ragline gateway", lifespan)
    # Questions are small; document uploads get the larger limit.
    checks = [Depends(no_control_characters)]
    app.include_router(router, max_body_size=settings.max_request_bytes, dependencies=checks)
    app.include_router(
        documents_router, max_body_size=settings.max_upload_bytes, dependencies=checks
    )
    install_hardening(app, settings)
    if not serves_openapi_docs(settings, auth):
        hide_openapi_docs(app)
    return app


OPENAPI_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def serves_openapi_docs(settings: GatewaySettings, auth: Authenticator) -> bool:
    """`OPENAPI_DOCS=auto`: only a gateway without keys (a local, anonymous stack) serves
    /docs and /openapi.json; with keys they would describe the API to anyone, unasked."""
    if settings.openapi_docs == "auto":
        return auth.anonymous is not None
    return settings.openapi_docs == "true"


def hide_openapi_docs(app: FastAPI) -> None:
    """FastAPI adds the documentation routes when the app is made (common's create_app);
    taken out here, they answer 404 like any unknown path. `app.openapi()` still works."""
    app.openapi_url = app.docs_url = app.redoc_url = None
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) not in OPENAPI_PATHS
    ]
