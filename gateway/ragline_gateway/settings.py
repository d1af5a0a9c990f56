"""Gateway settings (env prefix `RAGLINE_GATEWAY_`); the README's gateway table lists them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from ragline_common.settings import ServiceSettings
from ragline_gateway.ranking import RankingSetting


def _off_is_none(value: Any) -> Any:
    """`RAGLINE_GATEWAY_BLEND_MAX_DROP=off` (or `none`, or empty) turns a rule off."""
    if isinstance(value, str) and value.strip().lower() in {"", "off", "none"}:
        return None
    return value


# A cut-off threshold: a number, or off (None).
Threshold = Annotated[float | None, BeforeValidator(_off_is_none)]


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_GATEWAY_", extra="ignore")

    port: int = 8000
    # One base URL (Kubernetes: the Service), or several comma-separated, one per replica:
    # taken in turn, a read retried once on the next (clients/retriever.py).
    retriever_url: str = "http://127.0.0.1:8001"
    reranker_url: str = "http://127.0.0.1:8002"
    # The reranker's protocol: `rerank` (reranker-svc, vLLM, Jina, Cohere, Infinity) or
    # `tei` (Hugging Face text-embeddings-inference). Path empty: the API's usual one.
    reranker_api: Literal["rerank", "tei"] = "rerank"
    reranker_path: str = ""
    reranker_model: str = ""  # sent as `model` (rerank API) when set
    reranker_api_key: SecretStr = SecretStr("")  # sent as a Bearer token when set
    # Documents per upstream request (larger lists are split); 0: the API's default.
    reranker_max_documents: int = Field(default=0, ge=0, le=1000)
    # Probed by /readyz; empty: /readyz for reranker-svc, /health for TEI (use /health
    # for vLLM or Infinity too).
    reranker_health_path: str = ""
    llm_url: str = "http://127.0.0.1:8003"
    # Probed by /readyz and the health watch; empty: /readyz (llm-svc). `/health` for a
    # stock `vllm serve` (docs/llm-upstreams.md).
    llm_health_path: str = ""
    # Cache, rate limits and conversation memory. Empty: all three live in this process
    # (single replica only; logged at start).
    redis_url: str = ""
    redis_timeout_s: float = Field(default=0.5, gt=0)

    # API keys (auth.py): a JSON keys file (re-read when it changes) or the same JSON in
    # an environment variable. Without keys the gateway refuses to start, unless
    # `allow_anonymous` (a local stack: every request may do everything).
    api_keys_file: str = ""
    api_keys: SecretStr = SecretStr("")
    allow_anonymous: bool = False
    keys_reload_interval_s: float = Field(default=10.0, gt=0)
    # Per-key limits (limits.py) unless the key sets its own; 0: unlimited.
    requests_per_minute: int = Field(default=120, ge=0)
    max_streams_per_key: int = Field(default=8, ge=0)
    # What the rate limiter does when Redis fails: refuse (503) or admit without limits.
    rate_limit_on_redis_error: Literal["closed", "open"] = "closed"
    stream_lease_ttl_s: float = Field(default=60.0, ge=5)
    # Every authenticated call of a key (`GET /v1/models`, `/api/collections`, `/api/jobs`
    # reads included, and calls refused after authentication) also counts against a second
    # per-key window of `requests_per_minute` x this many calls a minute (limits.py); 0
    # turns that window off. Answers and document writes count against both.
    call_rate_multiplier: int = Field(default=10, ge=0)
    # Failed authentication (401) per client address (auth.py): after this many in any
    # `auth_failure_window_s`, that client's further calls get 429 with Retry-After until
    # the oldest failure leaves the window (per replica, in memory); 0 turns it off.
    auth_failure_limit: int = Field(default=20, ge=0)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    # Peers whose X-Forwarded-For names the client (addresses or CIDR networks, JSON list;
    # uvicorn's forwarded_allow_ips): nginx on the same host by default. Behind
    # ingress-nginx, name its pods' network, or all clients share its address (auth.py).
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])

    # Answer cache (cache.py): 0 turns it off.
    cache_ttl_s: int = Field(default=3600, ge=0)
    # Follow-ups: `concat` (previous question + this one) or `llm` (llm-svc rewrites).
    query_rewrite: Literal["concat", "llm"] = "concat"
    rewrite_timeout_s: float = Field(default=5.0, gt=0)
    rewrite_max_tokens: int = Field(default=64, ge=8, le=512)
    history_token_budget: int = Field(default=1500, ge=0)

    # Hardening: browser origins allowed to call the API (CORS), and request body limits.
    cors_origins: list[str] = Field(default_factory=list)
    max_request_bytes: int = Field(default=256 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # The request line and headers together, and the number of header lines: over either,
    # 431 with the JSON error envelope, the connection closed (hardening.py).
    max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    max_header_count: int = Field(default=100, ge=16)
    # /docs and /openapi.json: `auto` serves them only without API keys (anonymous local
    # stack), `true` always, `false` never.
    openapi_docs: Literal["auto", "true", "false"] = "auto"

    default_collection: str = "default"
    llm_model: str = Field(default="", description="model name sent to llm-svc; empty: ask it")
    # Open WebUI's `source` events (passage text in its citation dialog) on streamed
    # OpenAI answers: `auto` to clients recognised as Open WebUI or that ask for them
    # (openwebui.py), `always`, or `never`.
    openai_source_events: Literal["auto", "always", "never"] = "auto"
    max_tokens: int = Field(default=512, ge=1, le=8192)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)

    retrieve_candidates: int = Field(default=50, ge=1, le=200)
    rerank_top_n: int = Field(default=5, ge=1, le=50)
    # Step 3 (ranking.py): `reranker` (the reranker's scores), `blend` (BM25 and the stored
    # vectors' cosine from the retriever, no model call), `fused` (the retriever's RRF
    # order), or `auto`: `blend` while reranker-svc reports it has no cross-encoder, else
    # `reranker`. /readyz says which is in use.
    ranking: RankingSetting = "auto"
    # Blend score = w * BM25 / top BM25 + (1 - w) * cosine; 0.4 measured best on squad-dev.
    blend_lexical_weight: float = Field(default=0.4, ge=0.0, le=1.0)
    # Relevance cut-off on the blend score (0..1): of the top `rerank_top_n` sources, one
    # more than `max_drop` below the top source or under `min_score` is neither shown nor
    # put in the prompt; the top source always is. `off` turns a rule off. Requests may
    # override both (`source_max_drop`, `source_min_score`). Curve: docs/benchmarks.md.
    blend_max_drop: Threshold = Field(default=0.08, ge=0.0)
    blend_min_score: Threshold = None
    # The same cut-off on the reranker's scores, whose scale depends on its model: off
    # until calibrated for the model in use.
    reranker_max_drop: Threshold = Field(default=None, ge=0.0)
    reranker_min_score: Threshold = None
    max_question_chars: int = Field(default=4000, ge=1, le=100_000)
    max_top_k: int = Field(default=20, ge=1, le=50)

    # Per-stage timeouts (s): each stage fails on its own and degrades as ARCHITECTURE.md says.
    retrieve_timeout_s: float = Field(default=10.0, gt=0)
    rerank_timeout_s: float = Field(default=5.0, gt=0)
    llm_connect_timeout_s: float = Field(default=10.0, gt=0)
    llm_first_token_timeout_s: float = Field(default=60.0, gt=0)
    llm_idle_timeout_s: float = Field(default=60.0, gt=0)
    keepalive_interval_s: float = Field(default=15.0, gt=0)
    # Each upstream's health path is probed this often; after `upstream_down_after` probes
    # in a row go unanswered within `upstream_probe_timeout_s`, its requests fail at once
    # until a probe is answered (clients/base.py). 0 turns the probes off.
    upstream_probe_interval_s: float = Field(default=1.0, ge=0)
    upstream_probe_timeout_s: float = Field(default=2.0, gt=0)
    upstream_down_after: int = Field(default=3, ge=1)

    max_inflight_streams: int = Field(default=512, ge=1)
    history_turns: int = Field(default=6, ge=0, le=50)
    history_ttl_s: int = Field(default=86_400, ge=60)
    upstream_pool_size: int = Field(default=200, ge=1)
    # Which HTTP/1.1 client speaks to the plain-HTTP upstreams (retriever, reranker, llm):
    # `httptools`, the gateway's own transport that parses responses in C
    # (clients/http1.py: less CPU per relayed token), or `httpcore`, httpx's own transport
    # on the gateway's sockets (clients/network.py), kept to compare the two. `https`
    # upstreams use httpx's default transport either way.
    upstream_http: Literal["httptools", "httpcore"] = "httptools"
