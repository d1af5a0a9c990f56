"""`ragline_*` metrics for what the user feels (ARCHITECTURE.md, Conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

TIME_TO_FIRST_TOKEN = Histogram(
    "ragline_time_to_first_token_seconds",
    "From request arrival at the gateway to the first answer token sent.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "ragline_inter_token_seconds", "Gap between consecutive relayed tokens.", buckets=_TOKEN_BUCKETS
)
STAGE_DURATION = Histogram(
    "ragline_stage_duration_seconds",
    "Duration of each pipeline stage.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
ACTIVE_STREAMS = Gauge("ragline_active_streams", "Answer streams open on this replica.")
DEGRADED_ANSWERS = Counter(
    "ragline_degraded_answers_total", "Answers served degraded, by failed stage.", ["stage"]
)
UPSTREAM_ERRORS = Counter(
    "ragline_upstream_errors_total", "Failed calls to upstream services.", ["upstream"]
)
UPSTREAM_RETRIES = Counter(
    "ragline_upstream_retries_total",
    "Idempotent upstream calls retried on another replica (connection failure or 503).",
    ["upstream"],
)
UPSTREAM_UP = Gauge(
    "ragline_upstream_up",
    "1 while the upstream answers its health probes, 0 once it is known down (fail fast).",
    ["upstream"],
)
CLIENT_DISCONNECTS = Counter(
    "ragline_client_disconnects_total", "Streams the client closed before the answer ended."
)
ANSWERS = Counter("ragline_answers_total", "Answers by outcome.", ["outcome"])
RATE_LIMITED = Counter(
    "ragline_rate_limited_total", "Requests refused by a per-key limit, by limit.", ["limit"]
)
REDIS_ERRORS = Counter(
    "ragline_redis_errors_total", "Failed Redis calls, by what they were for.", ["use"]
)
CACHE_LOOKUPS = Counter(
    "ragline_cache_lookups_total", "Answer cache lookups, by result.", ["result"]
)

# The label values known in advance are exported at 0 from the start, so that rate() and
# the alert ratios see the first increment too (a series that is born at 1 has no "before")
# and the dashboards show 0 rather than "no data".
for _endpoint in ("api_chat", "openai"):
    TIME_TO_FIRST_TOKEN.labels(_endpoint)
for _stage in ("retrieve", "rerank", "generate"):
    STAGE_DURATION.labels(_stage)
for _stage in ("lexical", "dense", "rerank", "memory", "rewrite"):
    DEGRADED_ANSWERS.labels(_stage)
for _upstream in ("retriever", "reranker", "llm"):
    UPSTREAM_ERRORS.labels(_upstream)
UPSTREAM_RETRIES.labels("retriever")
for _outcome in ("completed", "incomplete", "cached"):
    ANSWERS.labels(_outcome)
for _limit in ("rate", "streams"):
    RATE_LIMITED.labels(_limit)
for _result in ("hit", "miss", "error"):
    CACHE_LOOKUPS.labels(_result)
for _use in ("rate_limit", "memory", "cache"):
    REDIS_ERRORS.labels(_use)
