"""The `ragline_rerank_*` metrics: what the batcher does and what it costs.

Pairs per second, two ways in PromQL: served, `rate(ragline_rerank_pairs_total[1m])`; and
the model's own speed while busy, `rate(ragline_rerank_pairs_total[1m]) /
rate(ragline_rerank_forward_seconds_sum[1m])`. Padding waste:
`1 - rate(ragline_rerank_batch_tokens_sum{kind="real"}[5m]) /
rate(ragline_rerank_batch_tokens_sum{kind="padded"}[5m])`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BATCH_PAIRS = Histogram(
    "ragline_rerank_batch_pairs",
    "Pairs scored per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_TOKENS = Histogram(
    "ragline_rerank_batch_tokens",
    "Tokens per forward pass: padded (longest pair x pairs, what the model computes) "
    "and real (the pairs' own lengths)",
    ["kind"],
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)
QUEUE_WAIT = Histogram(
    "ragline_rerank_queue_wait_seconds",
    "Time a chunk of pairs waited in the queue (after tokenizing) before its forward pass",
    buckets=_SECONDS,
)
TOKENIZE_SECONDS = Histogram(
    "ragline_rerank_tokenize_seconds", "Time to tokenize one request's pairs", buckets=_SECONDS
)
FORWARD_SECONDS = Histogram(
    "ragline_rerank_forward_seconds", "Duration of one forward pass", buckets=_SECONDS
)
FORWARD_PASSES = Counter("ragline_rerank_forward_passes_total", "Forward passes run")
FLUSHES = Counter(
    "ragline_rerank_flushes_total",
    "Why a forward pass started: full (the queued work fills a pass), "
    "no_more_expected (no admitted request is still being tokenized), "
    "deadline (the oldest queued work waited max_wait_ms)",
    ["reason"],
)
REQUESTS = Counter(
    "ragline_rerank_requests_total", "Rerank requests submitted to the batcher", ["outcome"]
)
PAIRS = Counter("ragline_rerank_pairs_total", "Pairs scored")
QUEUE_PAIRS = Gauge(
    "ragline_rerank_queue_pairs", "Pairs admitted and not yet in a forward pass (queue bound)"
)

# Known label values exported at 0 from the start, so that rate() sees the first increment.
for _outcome in ("ok", "overloaded", "cancelled", "error"):
    REQUESTS.labels(_outcome)
for _reason in ("full", "no_more_expected", "deadline"):
    FLUSHES.labels(_reason)
