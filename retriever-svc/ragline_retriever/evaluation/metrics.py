"""Ranking metrics over document ids, as the BEIR / trec_eval conventions define them.

Pure functions, so they can be checked against hand-computed values. Every function first
drops repeated ids (keeping the first, best-ranked occurrence): a hit list holds chunks,
several chunks map to one document, and a document found twice must not count twice.

- recall@k: relevant documents in the top k / all relevant documents of the query.
- MRR@k: 1 / rank of the first relevant document within the top k, else 0.
- nDCG@k: DCG with linear gain (grade / log2(rank + 1)), over the ideal DCG of the
  query's grades; the trec_eval `ndcg_cut` definition BEIR reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Qrels = Mapping[str, int]  # relevant document id → grade (> 0)

METRICS = ("recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10")


def first_occurrences(ids: Iterable[str]) -> list[str]:
    """The ids in order with repeats removed: each keeps its first (best) rank."""
    return list(dict.fromkeys(ids))


def _check(relevant: Qrels, k: int) -> None:
    if k < 1:
        raise ValueError("k must be >= 1")
    if not any(grade > 0 for grade in relevant.values()):
        raise ValueError("a query without relevant documents cannot be scored")


def recall_at(ranked: Sequence[str], relevant: Qrels, k: int) -> float:
    _check(relevant, k)
    wanted = {d for d, grade in relevant.items() if grade > 0}
    found = sum(1 for d in first_occurrences(ranked)[:k] if d in wanted)
    return found / len(wanted)


def mrr_at(ranked: Sequence[str], relevant: Qrels, k: int) -> float:
    _check(relevant, k)
    for rank, doc_id in enumerate(first_occurrences(ranked)[:k], start=1):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: Qrels, k: int) -> float:
    _check(relevant, k)
    dcg = sum(
        relevant.get(doc_id, 0) / math.log2(rank + 1)
        for rank, doc_id in enumerate(first_occurrences(ranked)[:k], start=1)
        if relevant.get(doc_id, 0) > 0
    )
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal, start=1))
    return dcg / idcg


def query_metrics(ranked: Sequence[str], relevant: Qrels) -> dict[str, float]:
    """The reported metrics (`METRICS`) of one query's ranked document ids."""
    return {
        "recall@1": recall_at(ranked, relevant, 1),
        "recall@5": recall_at(ranked, relevant, 5),
        "recall@20": recall_at(ranked, relevant, 20),
        "mrr@10": mrr_at(ranked, relevant, 10),
        "ndcg@10": ndcg_at(ranked, relevant, 10),
    }


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Macro average over queries (every query weighs the same), as BEIR reports."""
    if not per_query:
        raise ValueError("no queries to average")
    return {name: sum(q[name] for q in per_query) / len(per_query) for name in METRICS}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks.

    The same definition as numpy's default, so p50 of an even count is the midpoint.
    """
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
