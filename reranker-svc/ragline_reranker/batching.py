"""Dynamic micro-batching of score requests from concurrent callers, under a token budget.

A request goes through three stages:

1. **Admission.** Its pairs count against `max_queue_pairs` (pairs admitted and not yet in
   a forward pass); past it `score` raises `Overloaded` at once (the API answers 503 with
   Retry-After) instead of queueing work that would miss its deadline anyway.
2. **Tokenizing**, once, in the tokenizer thread (`Scorer.encode`): each pair's token
   count after truncation, and its features. The pairs are then sorted by length and cut
   into chunks that each fit one pass (`packing.plan_chunks`), and the chunks are queued.
   Tokenizing off the event loop and off the model thread lets it overlap the running pass.
   The two threads never share a tokenizer: a fast (Rust) tokenizer sets its truncation
   and padding state on every call, so one shared between `encode` here and a forward
   pass that pads (`SentenceTransformer.encode`, `CrossEncoder.predict`) let one thread
   switch padding off under the other, and the whole pass failed with "Unable to create
   tensor" (issue 14). The scorer's `encode` uses a tokenizer copy of its own, its
   `forward` the model's (see `scorers`); each executor has a single worker, so each
   tokenizer object is only ever used by one thread.
3. **Forward pass**, in the single model thread: the worker takes the oldest chunk plus,
   in arrival order, every queued chunk that still fits the pass (first fit), and scores
   them together. Scores are scattered back to each caller's order.

A pass is bounded by `max_batch_tokens` counted *padded* (the longest pair in the pass x
its pairs: what the model computes) and by `max_batch_pairs`.

When a pass starts (the flush rule), with work queued and the model free:

- at once if the queued work already fills a pass (`full`);
- at once if no admitted request is still being tokenized (`no_more_expected`): waiting
  could then only catch requests that have not reached the service yet, so an idle
  service scores a lone request with no added latency;
- otherwise when the request being tokenized lands, or `max_wait_ms` after the oldest
  queued chunk was queued (`deadline`), whichever comes first.

An empty queue is never polled: the worker sleeps on an event until a chunk arrives.
While a pass runs, new work queues up; when the model is free again the oldest chunk has
usually waited past `max_wait_ms` already, so under load passes follow back to back and
each takes as much of the queue as fits. The reason of each flush is counted
(`ragline_rerank_flushes_total{reason}`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ragline_reranker import metrics
from ragline_reranker.packing import plan_chunks
from ragline_reranker.scorers import Pair, Scorer

log = logging.getLogger("ragline.reranker.batching")


class Overloaded(Exception):
    """The queue bound is reached: the caller should retry later (503 + Retry-After)."""


@dataclass(eq=False)
class _Chunk:
    """Pairs of one request that go into the same forward pass, longest first."""

    positions: list[int]  # where each pair's score goes in the caller's list
    lengths: list[int]
    features: list[Any]
    future: asyncio.Future[list[float]]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: bool = False  # in a forward pass (or failed at shutdown): out of the queue

    @property
    def width(self) -> int:
        return self.lengths[0]  # sorted longest first by plan_chunks


class MicroBatcher:
    def __init__(
        self,
        scorer: Scorer,
        *,
        max_batch_tokens: int,
        max_batch_pairs: int,
        max_queue_pairs: int,
        max_wait_ms: float = 2.0,
    ) -> None:
        self.scorer = scorer
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self.max_wait = max_wait_ms / 1000
        self.forward_passes = 0  # this batcher's own count (the metric is process-wide)
        self.flushes: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._admitted = 0  # pairs admitted and not yet in a forward pass
        self._incoming = 0  # requests admitted and still being tokenized
        self._wakeup = asyncio.Event()
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-tokenize")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-forward")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_pairs(self) -> int:
        """Pairs admitted and not yet in a forward pass (what the queue bound counts)."""
        return self._admitted

    @property
    def incoming(self) -> int:
        """Requests admitted and still being tokenized."""
        return self._incoming

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="rerank-batcher")

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            chunk = self._queue.popleft()
            chunk.taken = True
            self._release(len(chunk.positions))
            if not chunk.future.done():
                chunk.future.set_exception(RuntimeError("reranker shutting down"))
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
        self._model.shutdown(wait=False, cancel_futures=True)

    # -- callers --------------------------------------------------------------------------

    async def score(self, pairs: list[Pair]) -> list[float]:
        """Scores for `pairs`, in order. Raises `Overloaded` when the queue is full."""
        if self._closed:
            raise RuntimeError("reranker shutting down")
        n = len(pairs)
        if n == 0:
            return []
        if self._admitted + n > self.max_queue_pairs:
            metrics.REQUESTS.labels("overloaded").inc()
            raise Overloaded(
                f"{self._admitted} pairs already queued, {n} more asked (limit "
                f"{self.max_queue_pairs})"
            )
        self._reserve(n)
        self._incoming += 1
        try:
            chunks = await self._tokenize(pairs)
        except BaseException as exc:
            self._release(n)
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
            metrics.REQUESTS.labels(outcome).inc()
            raise
        finally:
            self._incoming -= 1
            self._wakeup.set()  # new work, or one request fewer to wait for
        try:
            results = await asyncio.gather(*(c.future for c in chunks))
        except BaseException as exc:
            # The caller went away (client disconnect, timeout) or a pass failed: the rest
            # of its chunks leave the queue and the bound now, unscored.
            for chunk in chunks:
                chunk.future.cancel()
                if not chunk.taken:
                    chunk.taken = True
                    self._queue.remove(chunk)
                    self._release(len(chunk.positions))
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
            metrics.REQUESTS.labels(outcome).inc()
            raise
        scores = [0.0] * n
        for chunk, chunk_scores in zip(chunks, results, strict=True):
            for position, score in zip(chunk.positions, chunk_scores, strict=True):
                scores[position] = score
        metrics.REQUESTS.labels("ok").inc()
        return scores

    async def _tokenize(self, pairs: list[Pair]) -> list[_Chunk]:
        """Encode `pairs` in the tokenizer thread; queue them as pass-sized chunks."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        encoded = await loop.run_in_executor(self._tokenizer, self.scorer.encode, pairs)
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - start)
        if self._closed:
            raise RuntimeError("reranker shutting down")
        chunks = [
            _Chunk(
                positions=idx,
                lengths=[encoded.lengths[i] for i in idx],
                features=[encoded.features[i] for i in idx],
                future=loop.create_future(),
            )
            for idx in plan_chunks(encoded.lengths, self.max_batch_tokens, self.max_batch_pairs)
        ]
        self._queue.extend(chunks)
        return chunks

    def _reserve(self, pairs: int) -> None:
        self._admitted += pairs
        metrics.QUEUE_PAIRS.set(self._admitted)

    def _release(self, pairs: int) -> None:
        self._admitted -= pairs
        metrics.QUEUE_PAIRS.set(self._admitted)

    # -- the worker -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            reason = await self._next_flush()
            batch = self._take_batch()
            if batch:
                self.flushes[reason] += 1
                metrics.FLUSHES.labels(reason).inc()
                await self._forward(batch)

    async def _next_flush(self) -> str:
        """Wait, as the module docstring says, until a pass should start; say why."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queue_fills_pass():
                return "full"
            if self._incoming == 0:
                return "no_more_expected"
            remaining = self._queue[0].enqueued + self.max_wait - time.perf_counter()
            if remaining <= 0:
                return "deadline"
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return "deadline"

    def _queue_fills_pass(self) -> bool:
        """Would all queued work together reach a bound of one pass?"""
        pairs = width = 0
        for chunk in self._queue:
            pairs += len(chunk.positions)
            width = max(width, chunk.width)
            if pairs >= self.max_batch_pairs or pairs * width >= self.max_batch_tokens:
                return True
        return False

    def _take_batch(self) -> list[_Chunk]:
        """The oldest chunk, then each later one that still fits (first fit, in order).

        A chunk skipped for lack of room keeps its place; it is at the head, and so taken,
        once the chunks before it are gone: nothing waits for ever behind later work.
        """
        batch: list[_Chunk] = []
        kept: collections.deque[_Chunk] = collections.deque()
        pairs = width = 0
        while self._queue:
            chunk = self._queue.popleft()
            new_pairs = pairs + len(chunk.positions)
            new_width = max(width, chunk.width)
            if batch and (
                new_pairs > self.max_batch_pairs or new_pairs * new_width > self.max_batch_tokens
            ):
                kept.append(chunk)
                continue
            batch.append(chunk)
            chunk.taken = True
            pairs, width = new_pairs, new_width
            self._release(len(chunk.positions))
            if pairs >= self.max_batch_pairs:
                break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _forward(self, batch: list[_Chunk]) -> None:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        features: list[Any] = []
        lengths: list[int] = []
        for chunk in batch:
            metrics.QUEUE_WAIT.observe(now - chunk.enqueued)
            features.extend(chunk.features)
            lengths.extend(chunk.lengths)
        metrics.BATCH_PAIRS.observe(len(features))
        metrics.BATCH_TOKENS.labels("padded").observe(max(lengths) * len(lengths))
        metrics.BATCH_TOKENS.labels("real").observe(sum(lengths))
        metrics.FORWARD_PASSES.inc()
        self.forward_passes += 1
        try:
            scores = await loop.run_in_executor(self._model, self.scorer.forward, features)
            if len(scores) != len(features):
                raise RuntimeError(f"{len(scores)} scores for {len(features)} pairs")
        except asyncio.CancelledError:
            for chunk in batch:
                chunk.future.cancel()
            raise
        except Exception as exc:
            log.exception("forward pass failed", extra={"pairs": len(features)})
            for chunk in batch:
                if not chunk.future.done():
                    chunk.future.set_exception(exc)
            return
        finally:
            metrics.FORWARD_SECONDS.observe(time.perf_counter() - now)
        metrics.PAIRS.inc(len(features))
        offset = 0
        for chunk in batch:
            n = len(chunk.positions)
            if not chunk.future.done():
                chunk.future.set_result(scores[offset : offset + n])
            offset += n
