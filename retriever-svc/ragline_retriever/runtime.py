"""What the retriever holds for its lifetime: settings, the model and the two indexes.

Opened once in the app's lifespan, so `/readyz` turning 200 means the model is loaded and
the stores are open. A backend that cannot be opened at start (a remote store that is
down) does not stop the process: retrieval runs degraded on the other one, as
ARCHITECTURE.md asks, and readiness reports which one is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from ragline_retriever.backends import make_dense, make_lexical
from ragline_retriever.backends.base import DenseIndex, LexicalIndex
from ragline_retriever.embedding import Embedder
from ragline_retriever.settings import RetrieverSettings

log = logging.getLogger("ragline.retriever")


class Runtime:
    def __init__(self, settings: RetrieverSettings) -> None:
        self.settings = settings
        self.embedder = Embedder(
            settings.embedding_model,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch_size,
            cache_size=settings.query_cache_size,
        )
        self.lexical: LexicalIndex = make_lexical(settings)
        self.dense: DenseIndex | None = None
        self.ready = False
        # Ingests and deletes of one collection are serialized: "delete old chunks, write
        # new ones" must not interleave with another write of the same document.
        self._write_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def write_lock(self, collection: str) -> asyncio.Lock:
        return self._write_locks[collection]

    async def open(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.embedder.load()  # also tells the dense index its dimension
        self.dense = make_dense(self.settings, self.embedder.dim)
        for role, index in (("lexical", self.lexical), ("dense", self.dense)):
            try:
                await index.open()
            except Exception:
                log.exception(
                    "could not open the %s backend; serving degraded",
                    role,
                    extra={"backend": index.name},
                )
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for index in (self.lexical, self.dense):
            if index is None:
                continue
            try:
                await index.close()
            except Exception:
                log.exception("error closing %s", index.name)
        self.embedder.close()
