"""Pure parts of retriever-svc: reciprocal rank fusion and settings (chunking: test_chunking.py)."""

from __future__ import annotations

import pytest

from ragline_retriever.fusion import reciprocal_rank_fusion
from ragline_retriever.settings import RetrieverSettings

# --- fusion -----------------------------------------------------------------------------


def test_rrf_scores_are_the_sum_of_reciprocal_ranks() -> None:
    fused = reciprocal_rank_fusion({"lexical": ["a", "b", "c"], "dense": ["b", "d"]}, k=60)
    by_key = {f.key: f for f in fused}
    assert by_key["b"].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_key["a"].score == pytest.approx(1 / 61)
    assert by_key["d"].score == pytest.approx(1 / 62)
    assert [f.key for f in fused] == ["b", "a", "d", "c"]
    assert by_key["b"].ranks == {"lexical": 2, "dense": 1}
    assert by_key["c"].ranks == {"lexical": 3}


def test_rrf_k_changes_the_balance_between_top_rank_and_agreement() -> None:
    lists = {"lexical": ["x", "a", "b", "y"], "dense": ["z", "c", "d", "y"]}
    # Small k rewards being first somewhere; large k rewards appearing in both lists.
    assert reciprocal_rank_fusion(lists, k=1)[0].key == "x"
    assert reciprocal_rank_fusion(lists, k=60)[0].key == "y"


def test_rrf_counts_a_duplicate_once_at_its_best_rank_and_rejects_bad_k() -> None:
    fused = reciprocal_rank_fusion({"lexical": ["a", "a", "b"]}, k=10)
    assert [(f.key, f.ranks["lexical"]) for f in fused] == [("a", 1), ("b", 3)]
    assert fused[0].score == pytest.approx(1 / 11)
    assert reciprocal_rank_fusion({}, k=60) == []
    with pytest.raises(ValueError):
        reciprocal_rank_fusion({"lexical": ["a"]}, k=0)


# --- settings ---------------------------------------------------------------------------


def test_settings_refuse_overlap_not_smaller_than_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGLINE_RETRIEVER_CHUNK_SIZE", "40")
    monkeypatch.setenv("RAGLINE_RETRIEVER_CHUNK_OVERLAP", "40")
    with pytest.raises(ValueError, match="chunk_overlap"):
        RetrieverSettings(embedding_model="unused")
    monkeypatch.setenv("RAGLINE_RETRIEVER_CHUNK_OVERLAP", "8")
    monkeypatch.setenv("RAGLINE_RETRIEVER_LEXICAL_BACKEND", "elasticsearch")
    with pytest.raises(ValueError, match="ES_URL"):
        RetrieverSettings(embedding_model="unused")
    monkeypatch.setenv("RAGLINE_RETRIEVER_LEXICAL_BACKEND", "solr")
    with pytest.raises(ValueError):
        RetrieverSettings(embedding_model="unused")
