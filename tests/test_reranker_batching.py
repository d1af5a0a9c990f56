"""MicroBatcher in-process, on a real (tiny, random-weight) CrossEncoder.

The batcher's flush rule is the mechanism under test, so these tests drive it directly:
gates (threading events) hold a request in the tokenizer or a pass in the model thread,
which makes every interleaving deterministic. No sleeps: waits poll with a deadline.
Scores of a random-weight model mean nothing; only their equality and order are checked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from ragline_reranker.batching import MicroBatcher, Overloaded
from ragline_reranker.scorers import CrossEncoderScorer, Encoded, Pair
from ragline_reranker.tiny import build_tiny_cross_encoder

WORDS = "water boils at one hundred degrees at sea level and less on a mountain".split()


def doc(n_words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i + salt) % len(WORDS)] for i in range(n_words)) + f" #{salt}"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoderScorer:
    path = build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model")
    return CrossEncoderScorer(str(path), device="cpu")


class GatedScorer:
    """The real scorer, with gates to hold `encode` (per query) or `forward`, and a record
    of the token lengths of every forward pass."""

    def __init__(self, inner: CrossEncoderScorer) -> None:
        self.inner = inner
        self.kind, self.model_name, self.device = inner.kind, inner.model_name, inner.device
        self.dtype, self.max_length = inner.dtype, inner.max_length
        self.tokenize_once = inner.tokenize_once
        self.encode_gates: dict[str, threading.Event] = {}
        self.forward_gate: threading.Event | None = None
        self.forward_started = threading.Event()
        self.passes: list[list[int]] = []  # token lengths of each pass's pairs
        self.fail_next_forward = False

    def encode(self, pairs: Sequence[Pair]) -> Encoded:
        gate = self.encode_gates.get(pairs[0][0])
        if gate is not None:
            assert gate.wait(30), "test gate never opened"
        return self.inner.encode(pairs)

    def forward(self, features: list[Any]) -> list[float]:
        self.forward_started.set()
        if self.forward_gate is not None:
            assert self.forward_gate.wait(30), "test gate never opened"
        self.passes.append([len(f["input_ids"]) for f in features])
        if self.fail_next_forward:
            self.fail_next_forward = False
            raise RuntimeError("boom")
        return self.inner.forward(features)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return self.inner.score(pairs)


async def wait_until(condition: Callable[[], bool], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)  # yield to the loop; a poll, not a synchronisation sleep


def run(scorer: Any, body: Callable[[MicroBatcher], Awaitable[Any]], **limits: Any) -> Any:
    """Run `body(batcher)` on a started batcher and close it afterwards."""
    options = {
        "max_batch_tokens": 16_384,
        "max_batch_pairs": 128,
        "max_queue_pairs": 2048,
        "max_wait_ms": 2.0,
    } | limits

    async def main() -> Any:
        batcher = MicroBatcher(scorer, **options)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.close()

    return asyncio.run(main())


def one_by_one(scorer: CrossEncoderScorer, pairs: list[Pair]) -> list[float]:
    """The unbatched path: one pair per forward pass, no padding at all."""
    return [scorer.forward(scorer.encode([p]).features)[0] for p in pairs]


def test_concurrent_callers_share_passes_and_scores_match_unbatched(
    scorer: CrossEncoderScorer,
) -> None:
    requests = [
        [(f"question {i}?", doc(3 + 17 * j % 90, salt=i + j)) for j in range(8)] for i in range(12)
    ]

    async def body(batcher: MicroBatcher) -> tuple[list[list[float]], float]:
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.score(r) for r in requests))
        return results, time.perf_counter() - start

    # A long max_wait: the pass forms from every request already admitted, and the
    # elapsed time shows that nothing waited for the deadline.
    gated = GatedScorer(scorer)
    results, elapsed = run(gated, body, max_wait_ms=10_000)
    assert len(gated.passes) == 1, gated.passes  # 12 requests, 96 pairs: one pass
    assert elapsed < 10
    for request, scores in zip(requests, results, strict=True):
        assert scores == pytest.approx(one_by_one(scorer, request), abs=1e-5)


def test_a_lone_request_is_not_held_back(scorer: CrossEncoderScorer) -> None:
    async def body(batcher: MicroBatcher) -> tuple[list[float], float, dict[str, int]]:
        start = time.perf_counter()
        scores = await batcher.score([("q", doc(5)), ("q", doc(9))])
        return scores, time.perf_counter() - start, dict(batcher.flushes)

    scores, elapsed, flushes = run(scorer, body, max_wait_ms=10_000)
    assert len(scores) == 2
    assert flushes == {"no_more_expected": 1}
    assert elapsed < 10  # the 10 s deadline played no part


def test_queued_work_waits_for_a_request_still_being_tokenized(
    scorer: CrossEncoderScorer,
) -> None:
    gated = GatedScorer(scorer)
    gated.encode_gates["slow"] = slow_gate = threading.Event()

    async def body(batcher: MicroBatcher) -> None:
        fast = asyncio.create_task(batcher.score([("fast", doc(4)), ("fast", doc(30))]))
        slow = asyncio.create_task(batcher.score([("slow", doc(12))]))
        await wait_until(lambda: batcher.incoming == 1)  # "fast" queued, "slow" tokenizing
        assert batcher.forward_passes == 0  # held: more work is known to be on its way
        slow_gate.set()
        await asyncio.gather(fast, slow)
        assert batcher.forward_passes == 1
        assert dict(batcher.flushes) == {"no_more_expected": 1}

    run(gated, body, max_wait_ms=10_000)


def test_the_deadline_bounds_that_wait(scorer: CrossEncoderScorer) -> None:
    gated = GatedScorer(scorer)
    gated.encode_gates["slow"] = slow_gate = threading.Event()

    async def body(batcher: MicroBatcher) -> None:
        fast = asyncio.create_task(batcher.score([("fast", doc(4))]))
        slow = asyncio.create_task(batcher.score([("slow", doc(12))]))
        await asyncio.wait_for(fast, 30)  # scored while "slow" is still held
        assert not slow.done()
        assert dict(batcher.flushes) == {"deadline": 1}
        slow_gate.set()
        await slow
        assert dict(batcher.flushes) == {"deadline": 1, "no_more_expected": 1}

    run(gated, body, max_wait_ms=50)


def test_every_pass_respects_the_token_budget_and_length_sorting_keeps_order(
    scorer: CrossEncoderScorer,
) -> None:
    # Lengths deliberately out of order, so sorting must be undone when scattering back.
    sizes = [5, 300, 40, 120, 2, 80, 250, 15, 60, 190, 33, 7]
    pairs = [("how hot is boiling water?", doc(n, salt=i)) for i, n in enumerate(sizes)]
    gated = GatedScorer(scorer)
    budget = 600

    async def body(batcher: MicroBatcher) -> list[float]:
        return await batcher.score(pairs)

    scores = run(gated, body, max_batch_tokens=budget, max_batch_pairs=4)
    expected = one_by_one(scorer, pairs)
    assert len(set(round(s, 4) for s in expected)) == len(pairs)  # distinct: order shows
    assert scores == pytest.approx(expected, abs=1e-5)

    assert len(gated.passes) > 1  # the request was cut into several passes
    for lengths in gated.passes:
        assert len(lengths) <= 4
        assert len(lengths) == 1 or max(lengths) * len(lengths) <= budget, gated.passes
    # Longest pairs first, and each pass holds neighbours in length order: that is what
    # cuts the padding.
    flat = [n for lengths in gated.passes for n in lengths]
    assert flat == sorted(flat, reverse=True)
    padded = sum(max(p) * len(p) for p in gated.passes)
    # The same pass sizes cut in the caller's order would pad more.
    caller_order = scorer.encode(pairs).lengths
    unsorted = _cut(caller_order, [len(p) for p in gated.passes])
    assert padded < sum(max(c) * len(c) for c in unsorted)


def _cut(items: list[int], sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in sizes:
        out.append(items[start : start + n])
        start += n
    return out


def test_a_truncated_long_document_is_scored(scorer: CrossEncoderScorer) -> None:
    long_doc = doc(20_000)
    gated = GatedScorer(scorer)

    async def body(batcher: MicroBatcher) -> list[float]:
        return await batcher.score([("q", long_doc), ("q", doc(3))])

    scores = run(gated, body)
    assert max(n for p in gated.passes for n in p) == scorer.max_length == 512
    assert scores == pytest.approx(one_by_one(scorer, [("q", long_doc), ("q", doc(3))]), abs=1e-5)


def test_past_the_queue_bound_is_overloaded_and_the_bound_frees_up(
    scorer: CrossEncoderScorer,
) -> None:
    gated = GatedScorer(scorer)
    gated.forward_gate = gate = threading.Event()

    async def body(batcher: MicroBatcher) -> None:
        running = asyncio.create_task(batcher.score([("a", doc(5))] * 4))
        await asyncio.to_thread(gated.forward_started.wait, 30)  # the model is busy
        assert batcher.queued_pairs == 0  # pairs in a pass no longer count
        waiting = asyncio.create_task(batcher.score([("b", doc(5))] * 6))
        await wait_until(lambda: batcher.queued_pairs == 6 and batcher.incoming == 0)
        with pytest.raises(Overloaded):
            await batcher.score([("c", doc(5))] * 3)  # 6 + 3 > 8

        # A caller that goes away while queued gives its room back at once, unscored.
        gone = asyncio.create_task(batcher.score([("gone", doc(5))] * 2))
        await wait_until(lambda: batcher.queued_pairs == 8 and batcher.incoming == 0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queued_pairs == 6
        last = asyncio.create_task(batcher.score([("d", doc(5))] * 2))  # fits again

        gate.set()
        assert [len(await t) for t in (running, waiting, last)] == [4, 6, 2]
        assert batcher.queued_pairs == 0
        assert sum(len(p) for p in gated.passes) == 4 + 6 + 2  # "gone" never scored

    run(gated, body, max_queue_pairs=8)


def test_a_failed_pass_fails_its_callers_and_the_next_pass_works(
    scorer: CrossEncoderScorer,
) -> None:
    gated = GatedScorer(scorer)
    gated.fail_next_forward = True

    async def body(batcher: MicroBatcher) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.score([("q", doc(5))])
        assert len(await batcher.score([("q", doc(5))])) == 1
        assert batcher.queued_pairs == 0

    run(gated, body)


def test_score_without_a_batcher_matches_one_by_one(scorer: CrossEncoderScorer) -> None:
    """`score` (no batcher: sorted and cut by the budget) equals the one-by-one path."""
    pairs = [("q?", doc(n, salt=n)) for n in (3, 200, 50, 9, 120)]
    assert scorer.score(pairs) == pytest.approx(one_by_one(scorer, pairs), abs=1e-5)
