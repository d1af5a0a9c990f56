"""The scorers' two threads never share a tokenizer (issue 14), in-process.

The batcher runs `Scorer.encode` in its tokenizer thread while `Scorer.forward` runs in
its model thread. A Hugging Face fast tokenizer sets its Rust backend's truncation and
padding on every call, then encodes: with one tokenizer shared by both threads, an
`encode` landing between a padding forward pass's two steps switched padding off under
it, and the pass failed ("Unable to create tensor ... activate truncation and/or
padding"), a 500 for every request in it.

Timing makes that race rare; these tests make it certain: the forward pass's tokenizer
backend is wrapped so that, at the exact moment it has set padding and is about to
encode, the tokenizer thread's `encode` runs. With a shared tokenizer that fails every
time; with a tokenizer per thread it cannot. The micro-batcher test then drives the same
path with real threads and many concurrent callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ragline_reranker.batching import MicroBatcher
from ragline_reranker.scorers import BiEncoderScorer, CrossEncoderScorer, Pair
from ragline_reranker.tiny import build_tiny_cross_encoder

WORDS = "water boils at one hundred degrees at sea level and less on a mountain".split()


def doc(n_words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i + salt) % len(WORDS)] for i in range(n_words)) + f" #{salt}"


# Several lengths, one past every model's limit (truncated), so padding is needed.
PAIRS: list[Pair] = [("how hot is boiling water?", doc(n, salt=n)) for n in (2, 40, 9, 900)]


class EncodeMidPass:
    """Wraps a Rust tokenizer backend: the first time it encodes with padding set (what a
    forward pass does), it first runs `between` (the tokenizer thread's `encode`)."""

    def __init__(self, inner: Any, between: Callable[[], Any]) -> None:
        self._inner = inner
        self._between: Callable[[], Any] | None = between
        self.interleaved = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self._between is not None and self._inner.padding is not None:
            between, self._between = self._between, None
            between()
            self.interleaved += 1
        return self._inner.encode_batch(*args, **kwargs)


def model_tokenizer(scorer: BiEncoderScorer | CrossEncoderScorer) -> Any:
    """The tokenizer `forward` pads with (the model's own)."""
    return scorer._model[0].tokenizer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model"))


@pytest.fixture(scope="module")
def bi_encoder() -> BiEncoderScorer:
    return BiEncoderScorer(device="cpu")


def predict_path(tiny_path: str) -> CrossEncoderScorer:
    """The tiny cross-encoder forced onto `CrossEncoder.predict`, which pads in `forward`
    (the path LLM rerankers take)."""
    scorer = CrossEncoderScorer(tiny_path, device="cpu")
    scorer.tokenize_once = False
    return scorer


@pytest.mark.parametrize("kind", ["bi-encoder", "cross-encoder-predict"])
def test_encode_in_the_middle_of_a_padding_pass_changes_nothing(
    kind: str, bi_encoder: BiEncoderScorer, tiny_path: str
) -> None:
    scorer = bi_encoder if kind == "bi-encoder" else predict_path(tiny_path)
    features = scorer.encode(PAIRS).features
    expected_lengths = scorer.encode(PAIRS).lengths
    expected = scorer.forward(features)

    tokenizer = model_tokenizer(scorer)
    seen: list[list[int]] = []
    backend = EncodeMidPass(tokenizer._tokenizer, lambda: seen.append(scorer.encode(PAIRS).lengths))
    tokenizer._tokenizer = backend
    try:
        scores = scorer.forward(features)
    finally:
        tokenizer._tokenizer = backend._inner
    assert backend.interleaved == 1  # the interleaving really happened
    assert scores == pytest.approx(expected, abs=1e-6)
    assert seen == [expected_lengths]  # unpadded counts, as the token budget needs


def test_fast_path_forward_calls_no_tokenizer(tiny_path: str) -> None:
    """On the token-id fast path the model thread only pads ids: no tokenizer call."""
    scorer = CrossEncoderScorer(tiny_path, device="cpu")
    assert scorer.tokenize_once
    features = scorer.encode(PAIRS).features
    expected = scorer.forward(features)

    class NoCalls:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"forward touched the tokenizer backend: {name}")

    tokenizer = model_tokenizer(scorer)
    inner, tokenizer._tokenizer = tokenizer._tokenizer, NoCalls()
    try:
        scores = scorer.forward(features)
    finally:
        tokenizer._tokenizer = inner
    assert scores == pytest.approx(expected, abs=1e-6)


def test_many_concurrent_callers_on_the_predict_path_all_succeed(tiny_path: str) -> None:
    """Real threads: 16 callers x 12 requests through the micro-batcher, every request
    tokenized while passes that pad run; each score equals the pair's lone score."""
    scorer = predict_path(tiny_path)
    docs = [doc(n, salt=i) for i, n in enumerate((1, 5, 17, 60, 140, 700))]
    queries = [f"question {i}?" for i in range(4)]
    lone = {
        (q, d): scorer.forward(scorer.encode([(q, d)]).features)[0] for q in queries for d in docs
    }

    def request(caller: int, round_: int) -> list[Pair]:
        q = queries[(caller + round_) % len(queries)]
        start, n = (caller * 7 + round_) % len(docs), 1 + (caller + round_) % 4
        return [(q, docs[(start + k) % len(docs)]) for k in range(n)]

    async def main() -> tuple[int, list[str]]:
        batcher = MicroBatcher(
            scorer, max_batch_tokens=4096, max_batch_pairs=64, max_queue_pairs=4096
        )
        batcher.start()
        failures: list[str] = []

        async def caller(c: int) -> None:
            for r in range(12):
                pairs = request(c, r)
                try:
                    scores = await batcher.score(pairs)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                assert scores == pytest.approx([lone[p] for p in pairs], abs=1e-5)

        try:
            await asyncio.gather(*(caller(c) for c in range(16)))
        finally:
            await batcher.close()
        return batcher.forward_passes, failures

    passes, failures = asyncio.run(main())
    assert failures == [], f"{len(failures)} of 192 requests failed: {failures[:3]}"
    assert passes < 192  # callers really shared passes (so encode overlapped forward)
