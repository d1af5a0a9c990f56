"""Pure parts of retriever-svc: reciprocal rank fusion and chunking."""

from __future__ import annotations

import itertools

import pytest

from ragline_retriever.chunking import chunk_id, split_text
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


# --- chunking ---------------------------------------------------------------------------

SENTENCES = " ".join(f"Sentence number {i} has exactly seven words." for i in range(40))


def words(text: str) -> list[str]:
    return text.split()


def test_short_document_is_one_chunk_with_its_text_unchanged() -> None:
    text = "A short note.\n\nWith a second paragraph."
    chunks = split_text(text, size=100, overlap=10)
    assert [(c.position, c.text) for c in chunks] == [(0, text)]
    assert split_text("   \n ", size=100, overlap=10) == []


def test_chunks_respect_size_overlap_and_cover_every_word() -> None:
    chunks = split_text(SENTENCES, size=50, overlap=14)
    assert len(chunks) > 4
    assert all(len(words(c.text)) <= 50 for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for before, after in itertools.pairwise(chunks):
        # Overlap: the next chunk starts with the last two whole sentences of this one.
        assert before.text.endswith(".")
        assert after.text.startswith("Sentence number")
        assert before.text.endswith(" ".join(words(after.text)[:14]))
    # Every word of the document appears in some chunk, in order.
    seen = {w for c in chunks for w in words(c.text)}
    assert seen == set(words(SENTENCES))
    assert chunks[-1].text.endswith("39 has exactly seven words.")


def test_chunks_prefer_sentence_ends_over_exact_size() -> None:
    text = "Alpha beta gamma delta. " + "word " * 30
    chunks = split_text(text, size=8, overlap=0)
    assert chunks[0].text == "Alpha beta gamma delta."
    assert len(words(chunks[1].text)) == 8  # no sentence end: a plain 8-word window


def test_chunking_is_deterministic_and_ids_derive_from_doc_and_position() -> None:
    first = split_text(SENTENCES, size=40, overlap=8)
    assert first == split_text(SENTENCES, size=40, overlap=8)
    assert chunk_id("doc-1", 3) == "doc-1#3"
    assert chunk_id("doc-1", 3) != chunk_id("doc-1", 4)


def test_overlong_words_are_split_so_chunks_stay_bounded() -> None:
    chunks = split_text("x" * 1000, size=10, overlap=2)
    assert all(len(c.text) <= 10 * 41 for c in chunks)
    assert "".join(c.text for c in split_text("y" * 1000, size=10, overlap=0)) == "y" * 1000


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
