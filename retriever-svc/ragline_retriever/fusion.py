"""Reciprocal rank fusion over the lexical and dense ranked lists.

RRF uses ranks only, so BM25 scores (unbounded) and cosine similarities (bounded) need no
calibration against each other; k damps the weight of the very top ranks. Optional
per-list weights scale each list's reciprocal ranks (score = sum of weight / (k + rank)),
for when one backend is measurably better on a corpus (`ragline eval --sweep` measures it);
every weight 1 is plain RRF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_K = 60


@dataclass(frozen=True)
class Fused:
    key: str
    score: float
    # 1-based rank in each input list that contained the key.
    ranks: dict[str, int] = field(default_factory=dict)


def reciprocal_rank_fusion(
    ranked: Mapping[str, Sequence[str]],
    k: int = DEFAULT_K,
    weights: Mapping[str, float] | None = None,
) -> list[Fused]:
    """Fuse ranked id lists (name → ids, best first); ties keep first-seen order.

    A duplicate id within one list counts once, at its best rank. `weights` maps a list
    name to the factor on its reciprocal ranks; a name it does not mention weighs 1.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    weights = weights or {}
    for name, weight in weights.items():
        if not weight >= 0:  # also rejects NaN
            raise ValueError(f"weight of {name!r} must be >= 0, got {weight}")
    scores: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    for name, ids in ranked.items():
        weight = weights.get(name, 1.0)
        for position, key in enumerate(ids, start=1):
            seen = ranks.setdefault(key, {})
            if name in seen:
                continue
            seen[name] = position
            scores[key] = scores.get(key, 0.0) + weight / (k + position)
    order = sorted(scores, key=lambda key: -scores[key])  # stable: ties keep first-seen
    return [Fused(key, scores[key], ranks[key]) for key in order]
