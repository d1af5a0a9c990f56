"""Sentence-transformers embedder: normalized vectors, computed off the event loop.

Normalized vectors make cosine similarity a dot product, which is what the Milvus COSINE
index expects either way. Query embeddings are cached (LRU) because chat traffic repeats
questions and a cache hit saves the ~10 ms the model costs per query on CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ragline_retriever.metrics import EMBEDDING_SECONDS

log = logging.getLogger("ragline.retriever.embedding")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    def __init__(
        self, model: str, device: str = "auto", batch_size: int = 32, cache_size: int = 1024
    ) -> None:
        self.model_name = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._model = None
        self._cache: OrderedDict[str, list[float]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Two workers: a long ingest batch should not queue every query behind it.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embed")
        self.dim = 0

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from sentence_transformers import SentenceTransformer

        start = time.perf_counter()
        self._model = SentenceTransformer(self.model_name, device=self.device)
        self.dim = int(self._model.get_embedding_dimension() or 0)
        if self.dim < 1:
            raise RuntimeError(f"model {self.model_name!r} reports no embedding dimension")
        log.info(
            "embedding model loaded",
            extra={
                "model": self.model_name,
                "device": self.device,
                "dim": self.dim,
                "load_s": round(time.perf_counter() - start, 2),
            },
        )

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _encode(self, texts: list[str]) -> list[list[float]]:
        if self._model is None:
            raise RuntimeError("embedding model is not loaded")
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [v.tolist() for v in vectors]

    async def embed_passages(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        with EMBEDDING_SECONDS.labels("passages").time():
            return await loop.run_in_executor(self._executor, self._encode, list(texts))

    async def embed_query(self, text: str) -> list[float]:
        with self._cache_lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached
        loop = asyncio.get_running_loop()
        with EMBEDDING_SECONDS.labels("query").time():
            vector = (await loop.run_in_executor(self._executor, self._encode, [text]))[0]
        if self.cache_size:
            with self._cache_lock:
                self._cache[text] = vector
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return vector

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
