"""reranker-svc's scorers in-process: the token-id fast path feeds the model exactly what
sentence-transformers would, truncation, dtypes, and the guard against random heads.

The cross-encoders here are built locally with random weights (`ragline_reranker.tiny`):
their scores are compared with each other, never read as relevance.
"""

from __future__ import annotations

import pytest
import torch

from ragline_reranker.scorers import (
    BiEncoderScorer,
    CrossEncoderScorer,
    UntrainedHeadError,
    packaged_bi_encoder_path,
    resolve_device,
    resolve_dtype,
)
from ragline_reranker.tiny import build_tiny_cross_encoder

QUERY = "What is the boiling point of water at sea level?"
DOCS = [
    "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
    "Basketball was invented by James Naismith in 1891.",
    "short",
    " ".join(["Photosynthesis turns sunlight, carbon dioxide and water into sugar."] * 30),
    " ".join(["a very long document"] * 2000),  # far past 512 tokens: truncated
]
PAIRS = [(QUERY, d) for d in DOCS]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model"))


@pytest.fixture(scope="module")
def scorer(tiny_path: str) -> CrossEncoderScorer:
    return CrossEncoderScorer(tiny_path, device="cpu")


def test_token_ids_are_kept_and_scores_equal_sentence_transformers_predict(
    scorer: CrossEncoderScorer, tiny_path: str
) -> None:
    from sentence_transformers import CrossEncoder

    assert scorer.tokenize_once  # a BERT sequence classifier takes the fast path
    reference = CrossEncoder(tiny_path, device="cpu", local_files_only=True)
    expected = reference.predict([list(p) for p in PAIRS], batch_size=len(PAIRS))
    encoded = scorer.encode(PAIRS)
    assert all(
        set(f) == {"input_ids", "token_type_ids", "attention_mask"} for f in encoded.features
    )
    assert scorer.forward(encoded.features) == pytest.approx(expected.tolist(), abs=1e-6)


def test_the_predict_path_gives_the_same_scores(tiny_path: str) -> None:
    """Models the fast path cannot feed go through `CrossEncoder.predict`: same numbers."""
    fast = CrossEncoderScorer(tiny_path, device="cpu")
    slow = CrossEncoderScorer(tiny_path, device="cpu")
    slow.tokenize_once = False
    encoded = slow.encode(PAIRS)
    assert encoded.features == [list(p) for p in PAIRS]  # pairs, tokenized again later
    assert encoded.lengths == fast.encode(PAIRS).lengths
    assert slow.forward(encoded.features) == pytest.approx(fast.score(PAIRS), abs=1e-6)


def test_long_documents_are_truncated_to_the_model_limit_or_the_setting(tiny_path: str) -> None:
    default = CrossEncoderScorer(tiny_path, device="cpu")
    assert default.max_length == 512  # the model's own limit
    lengths = default.encode(PAIRS).lengths
    assert lengths[4] == 512 and lengths[2] < 20

    short = CrossEncoderScorer(tiny_path, device="cpu", max_length=32)
    encoded = short.encode(PAIRS)
    assert max(encoded.lengths) == 32
    # The document is cut, not the query: [CLS] + the whole query + [SEP] lead every pair.
    query_ids = short._tokenizer(QUERY)["input_ids"]
    assert all(f["input_ids"][: len(query_ids)] == query_ids for f in encoded.features)
    scores = short.score(PAIRS)
    assert len(scores) == len(PAIRS)
    # Seeing only the start of a long document changes its score.
    assert scores[3] != pytest.approx(default.score(PAIRS)[3], abs=1e-6)

    clamped = CrossEncoderScorer(tiny_path, device="cpu", max_length=4096)
    assert clamped.max_length == 512  # never past the position table


def test_half_precision_path(tiny_path: str) -> None:
    """The cast used on CUDA (fp16 weights, scores upcast to fp32), exercised on CPU."""
    full = CrossEncoderScorer(tiny_path, device="cpu")
    half = CrossEncoderScorer(tiny_path, device="cpu", dtype="float16")
    assert half.dtype == torch.float16
    assert {p.dtype for p in half._model.parameters()} == {torch.float16}
    scores = half.score(PAIRS)
    assert all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(full.score(PAIRS), abs=0.02)


def test_device_and_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_checkpoint_without_a_head_is_refused() -> None:
    # The bi-encoder checkpoint has no classification head: loading it as a cross-encoder
    # would rank with random weights, which must never happen silently.
    with pytest.raises(UntrainedHeadError):
        CrossEncoderScorer(packaged_bi_encoder_path(), device="cpu")


def test_bi_encoder_batched_equals_one_by_one() -> None:
    scorer = BiEncoderScorer(device="cpu")
    pairs = [*PAIRS[:4], ("another query", "tiny doc")]
    batched = scorer.forward(scorer.encode(pairs).features)
    one_by_one = [scorer.forward([p])[0] for p in pairs]
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert batched[0] > batched[1] + 0.1  # real weights: the answer is closest
