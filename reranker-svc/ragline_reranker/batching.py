"""Dynamic micro-batching of score requests from concurrent callers.

Callers submit their pairs and await a future. One worker task takes the oldest waiting
item and then everything already queued, up to `max_batch_pairs`, and runs ONE forward
pass in a single worker thread. There is no fixed wait on an empty queue: the first
request runs at once, and the next batch forms from what arrives while the model runs.

A request larger than `max_batch_pairs` is split into chunks of at most that size; a
batch never splits a chunk. The queue is bounded in pairs: past `max_queue_pairs` waiting
pairs a submit raises `Overloaded` (the API answers 503 with Retry-After).

Seam for later work: `_take_batch` is the one place that decides what goes into a pass
(token-budget batching with length sorting belongs there).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from ragline_reranker.scorers import Pair, Scorer

log = logging.getLogger("ragline.reranker.batching")

BATCH_PAIRS = Histogram(
    "ragline_rerank_batch_pairs",
    "Pairs scored per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_WAIT = Histogram(
    "ragline_rerank_queue_wait_seconds",
    "Time a chunk of pairs waited in the queue before its forward pass started",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FORWARD_PASSES = Counter("ragline_rerank_forward_passes_total", "Forward passes run")
REQUESTS = Counter(
    "ragline_rerank_requests_total", "Rerank requests submitted to the batcher", ["outcome"]
)
PAIRS = Counter("ragline_rerank_pairs_total", "Pairs scored")


class Overloaded(Exception):
    pass


@dataclass
class _Item:
    pairs: list[Pair]
    future: asyncio.Future[list[float]]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, scorer: Scorer, *, max_batch_pairs: int, max_queue_pairs: int) -> None:
        self.scorer = scorer
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_pairs = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-forward")
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="rerank-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("reranker shutting down"))
        self._queued_pairs = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, pairs: list[Pair]) -> list[float]:
        """Scores for `pairs`, in order. Raises `Overloaded` when the queue is full."""
        if not pairs:
            return []
        if self._queued_pairs + len(pairs) > self.max_queue_pairs:
            REQUESTS.labels("overloaded").inc()
            raise Overloaded(
                f"{self._queued_pairs} pairs already queued (limit {self.max_queue_pairs})"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(pairs), self.max_batch_pairs):
            chunk = pairs[start : start + self.max_batch_pairs]
            fut: asyncio.Future[list[float]] = loop.create_future()
            self._queue.append(_Item(chunk, fut))
            self._queued_pairs += len(chunk)
            futures.append(fut)
        self._wakeup.set()
        try:
            # If this caller is cancelled, gather cancels the futures and the worker
            # drops those chunks instead of scoring them.
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            REQUESTS.labels("cancelled").inc()
            raise
        except Exception:
            REQUESTS.labels("error").inc()
            raise
        REQUESTS.labels("ok").inc()
        return [s for chunk_scores in results for s in chunk_scores]

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled caller: drop
                self._queue.popleft()
                self._queued_pairs -= len(item.pairs)
                continue
            if batch and size + len(item.pairs) > self.max_batch_pairs:
                break
            self._queue.popleft()
            self._queued_pairs -= len(item.pairs)
            batch.append(item)
            size += len(item.pairs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            if not batch:
                continue
            now = time.perf_counter()
            pairs: list[Pair] = []
            for item in batch:
                QUEUE_WAIT.observe(now - item.enqueued)
                pairs.extend(item.pairs)
            BATCH_PAIRS.observe(len(pairs))
            FORWARD_PASSES.inc()
            try:
                scores = await loop.run_in_executor(self._executor, self.scorer.score, pairs)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            except Exception as exc:
                log.exception("forward pass failed", extra={"pairs": len(pairs)})
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            PAIRS.inc(len(pairs))
            offset = 0
            for item in batch:
                n = len(item.pairs)
                if not item.future.done():
                    item.future.set_result(scores[offset : offset + n])
                offset += n
