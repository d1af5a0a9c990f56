"""Ingest and delete: chunk, embed, write to both indexes.

Writing a document replaces it: each store's `upsert` makes the new chunks the whole set
for that document (stale chunks of a longer old version are removed), and chunk ids are
derived from (doc_id, position), so ingesting the same batch twice changes nothing.
The two stores are written concurrently; if either fails the request is a 503 and may
have been applied to one store only — retrying the same request repairs that, since the
write is idempotent. (Async jobs with verification are the later seam for big batches.)
"""

from __future__ import annotations

import asyncio
import logging
import time

from ragline_common.errors import ApiError
from ragline_common.wire import DocumentIn, IngestResponse
from ragline_retriever.backends.base import Chunk, CollectionNotFound
from ragline_retriever.chunking import chunk_id, split_text
from ragline_retriever.metrics import INGESTED_CHUNKS
from ragline_retriever.runtime import Runtime

log = logging.getLogger("ragline.retriever.ingest")


def chunk_documents(
    documents: list[DocumentIn], size: int, overlap: int
) -> tuple[list[Chunk], list[str]]:
    """Chunks of all documents, and the ids of documents that yield no chunk at all."""
    latest = {doc.id: doc for doc in documents}  # a repeated id in one batch: last wins
    chunks: list[Chunk] = []
    empty: list[str] = []
    for doc in latest.values():
        pieces = split_text(doc.text, size, overlap)
        if not pieces:
            empty.append(doc.id)
        for piece in pieces:
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(doc.id, piece.position),
                    doc_id=doc.id,
                    text=piece.text,
                    position=piece.position,
                    title=doc.title,
                    url=doc.url,
                    source=doc.source,
                    metadata=dict(doc.metadata),
                )
            )
    return chunks, empty


def embedding_input(chunk: Chunk) -> str:
    # The title often names the subject that the passage only refers to ("it", "the band").
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _unavailable(exc: BaseException) -> ApiError:
    log.error("index write failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
    return ApiError(
        503, "index_unavailable", "an index could not be written; the request is safe to retry"
    )


async def ingest(rt: Runtime, collection: str, documents: list[DocumentIn]) -> IngestResponse:
    settings = rt.settings
    timings: dict[str, float] = {}
    start = time.perf_counter()
    chunks, empty = chunk_documents(documents, settings.chunk_size, settings.chunk_overlap)
    timings["chunk_ms"] = _ms(start)

    embed_start = time.perf_counter()
    try:
        vectors = await rt.embedder.embed_passages([embedding_input(c) for c in chunks])
    except Exception as exc:
        log.exception("embedding failed")
        raise ApiError(503, "embedding_unavailable", "the embedding model failed") from exc
    timings["embed_ms"] = _ms(embed_start)

    dense = rt.dense
    if dense is None:
        raise ApiError(503, "index_unavailable", "the dense index is not open")
    write_start = time.perf_counter()
    async with rt.write_lock(collection):
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    rt.lexical.ensure_collection(collection), dense.ensure_collection(collection)
                ),
                settings.write_timeout_s,
            )
            await asyncio.wait_for(
                asyncio.gather(
                    rt.lexical.upsert(collection, chunks),
                    dense.upsert(collection, chunks, vectors),
                    *(_delete_both(rt, collection, doc_id) for doc_id in empty),
                ),
                settings.write_timeout_s,
            )
        except ApiError:
            raise
        except Exception as exc:
            raise _unavailable(exc) from exc
    timings["write_ms"] = _ms(write_start)
    timings["total_ms"] = _ms(start)
    INGESTED_CHUNKS.inc(len(chunks))
    log.info(
        "ingested",
        extra={
            "collection": collection,
            "documents": len(documents),
            "chunks": len(chunks),
            **timings,
        },
    )
    return IngestResponse(
        collection=collection,
        documents=len({d.id for d in documents}),
        chunks=len(chunks),
        timings=timings,
    )


async def _delete_both(rt: Runtime, collection: str, doc_id: str) -> int:
    assert rt.dense is not None
    results = await asyncio.gather(
        rt.lexical.delete_document(collection, doc_id),
        rt.dense.delete_document(collection, doc_id),
        return_exceptions=True,
    )
    found = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures and not all(isinstance(f, CollectionNotFound) for f in failures):
        raise next(f for f in failures if not isinstance(f, CollectionNotFound))
    if not found:
        raise CollectionNotFound(collection)
    return max(found)


async def delete_document(rt: Runtime, collection: str, doc_id: str) -> bool:
    """True when the document existed (in either store) and is now gone from both."""
    if rt.dense is None:
        raise ApiError(503, "index_unavailable", "the dense index is not open")
    async with rt.write_lock(collection):
        try:
            removed = await asyncio.wait_for(
                _delete_both(rt, collection, doc_id), rt.settings.write_timeout_s
            )
        except CollectionNotFound as exc:
            raise ApiError(
                404, "collection_not_found", f"collection {collection!r} does not exist"
            ) from exc
        except Exception as exc:
            raise _unavailable(exc) from exc
    return removed > 0


async def list_collections(rt: Runtime) -> dict[str, int]:
    """Collections known to either store; chunk counts from the dense store when it answers."""
    stores = [rt.lexical] + ([rt.dense] if rt.dense is not None else [])
    results = await asyncio.gather(
        *(
            asyncio.wait_for(s.list_collections(), rt.settings.lexical_timeout_s * 2)
            for s in stores
        ),
        return_exceptions=True,
    )
    answered = [r for r in results if not isinstance(r, BaseException)]
    if not answered:
        raise ApiError(503, "index_unavailable", "no index answered")
    merged: dict[str, int] = {}
    for counts in answered:  # lexical first, so dense (later) wins where both know it
        merged.update(counts)
    return dict(sorted(merged.items()))
