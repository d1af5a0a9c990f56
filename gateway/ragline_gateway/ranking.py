"""Step 3 of the answer pipeline without the reranker: the `blend` ranking, and the
relevance cut-off that decides which sources are shown and put in the prompt.

Rankings (`RAGLINE_GATEWAY_RANKING`; `auto` picks one, see `resolve`):

- `reranker`: the reranker's scores: a trained cross-encoder (production).
- `blend`: the default without a trained cross-encoder. Each candidate scores
  `w * bm25 / top bm25 + (1 - w) * cosine` from the scores the retriever already returns
  (BM25 of the lexical search; cosine of the query and the chunk's stored vector), so
  nothing is embedded again and it costs well under a millisecond. A score a backend did
  not give counts 0; with one backend down (`degraded`), the other's score alone ranks
  (its weight becomes 1), which is that backend's own order.
- `fused`: the retriever's RRF order as it comes (also the fallback when the reranker
  fails, ARCHITECTURE.md).

Measured on squad-dev (473 questions, benchmarks/ranking_squad.py; docs/benchmarks.md):
blend with w = 0.4 puts the gold paragraph first for 0.848 of the questions (fused 0.805,
reranker-svc's bi-encoder fallback 0.717), MRR@10 0.906 (fused 0.884).

The cut-off: of the top `top_k` sources, one scoring more than `max_drop` below the top
source, or under `min_score`, is dropped; the top source always stays. Scores are the
ranking's own, so thresholds belong to one ranking: `blend` has calibrated defaults,
the reranker's scale depends on its model (none by default), and the fused order has no
cut-off (RRF scores are ranks in disguise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ragline_common.wire import Hit

Ranking = Literal["reranker", "blend", "fused"]
RankingSetting = Literal["auto", "reranker", "blend", "fused"]

# What reranker-svc's /readyz says when it has no cross-encoder (its bi-encoder fallback).
NO_CROSS_ENCODER = "bi-encoder"


def resolve(setting: RankingSetting, reranker_scorer: str | None) -> Ranking:
    """The ranking in use. `auto`: `blend` when reranker-svc reports that it has no
    cross-encoder (scoring with its bi-encoder would re-embed every candidate and rank worse
    than the fused order); otherwise, also while the reranker is not yet known or is
    another rerank server (TEI, vLLM), `reranker`."""
    if setting != "auto":
        return setting
    return "blend" if reranker_scorer == NO_CROSS_ENCODER else "reranker"


def blend(hits: Sequence[Hit], lexical_weight: float) -> list[tuple[Hit, float]]:
    """Every hit with its blend score, best first (ties keep the fused order)."""
    lexical = [h.scores.get("lexical") for h in hits]
    dense = [h.scores.get("dense") for h in hits]
    top_lexical = max((s for s in lexical if s is not None), default=None)
    has_dense = any(s is not None for s in dense)
    if top_lexical is None or top_lexical <= 0:  # no lexical scores: lexical down
        weight = 0.0
    elif not has_dense:  # no cosine: dense down
        weight = 1.0
    else:
        weight = lexical_weight
    scored = [
        (h, weight * (lex or 0.0) / (top_lexical or 1.0) + (1.0 - weight) * (cos or 0.0))
        for h, lex, cos in zip(hits, lexical, dense, strict=True)
    ]
    order = sorted(range(len(scored)), key=lambda i: -scored[i][1])  # stable
    return [scored[i] for i in order]


@dataclass(frozen=True)
class Cutoff:
    """Which of the ranked sources are relevant enough to show; None turns a rule off."""

    max_drop: float | None = None
    min_score: float | None = None

    @property
    def off(self) -> bool:
        return self.max_drop is None and self.min_score is None

    def apply(self, ranked: list[tuple[Hit, float]]) -> list[tuple[Hit, float]]:
        """`ranked` (best first) without the sources below the cut; never empty if it was not."""
        if self.off or not ranked:
            return ranked
        floor = -float("inf")
        if self.max_drop is not None:
            floor = ranked[0][1] - self.max_drop
        if self.min_score is not None:
            floor = max(floor, self.min_score)
        return ranked[:1] + [(h, s) for h, s in ranked[1:] if s >= floor]
