"""Ingest and delete: chunk, embed, then write both indexes through the journal.

Writing a document replaces it: each store's `upsert` makes the new chunks the whole set
for that document (stale chunks of a longer old version are removed), and chunk ids are
derived from (doc_id, position), so ingesting the same batch twice changes nothing.
The two stores are written concurrently by `StoreWriter` (writes.py); a store that fails
keeps the write journaled and gets it replayed, so the stores converge. A request whose
write is still owed by one store is a 503 `index_write_pending`: nothing is lost, and
retrying is safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ragline_common.errors import ApiError
from ragline_common.wire import MAX_TITLE_CHARS, DocumentIn, IngestResponse
from ragline_retriever.backends.base import Chunk
from ragline_retriever.chunking import chunk_id, split_text
from ragline_retriever.journal import WriteOp
from ragline_retriever.metrics import INGESTED_CHUNKS
from ragline_retriever.parsing import UnsupportedDocument, parse_document
from ragline_retriever.runtime import Runtime
from ragline_retriever.writes import JournalFull, WriteResult

log = logging.getLogger("ragline.retriever.ingest")


def readable(doc: DocumentIn) -> tuple[str, str]:
    """The document's text as the chunker reads it, and its title (its own, else the one
    the format names: an HTML <title>, a Markdown front matter or first heading)."""
    if doc.format == "text":
        return doc.text, doc.title
    try:
        parsed = parse_document(doc.text, doc.format)
    except UnsupportedDocument as exc:
        raise ApiError(422, "unsupported_document", f"document {doc.id!r}: {exc}") from exc
    # A heading can be any length; the title field has the same bound as DocumentIn's.
    return parsed.text, doc.title or parsed.title[:MAX_TITLE_CHARS]


def chunk_documents(
    documents: list[DocumentIn], size: int, overlap: int
) -> tuple[list[Chunk], list[str]]:
    """Chunks of all documents, and the ids of documents that yield no chunk at all."""
    latest = {doc.id: doc for doc in documents}  # a repeated id in one batch: last wins
    chunks: list[Chunk] = []
    empty: list[str] = []
    for doc in latest.values():
        text, title = readable(doc)
        pieces = split_text(text, size, overlap)
        if not pieces:
            empty.append(doc.id)
        for piece in pieces:
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(doc.id, piece.position),
                    doc_id=doc.id,
                    text=piece.text,
                    position=piece.position,
                    title=title,
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


@dataclass
class Ingested:
    response: IngestResponse
    write: WriteResult


async def write_documents(rt: Runtime, collection: str, documents: list[DocumentIn]) -> Ingested:
    """Chunk, embed and write through the journal; the caller decides what a write that
    is still pending in one store means (a 503 for a request, a wait for a job)."""
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

    write_start = time.perf_counter()
    result = await _write(
        rt, collection, WriteOp(chunks=chunks, vectors=vectors, delete_doc_ids=empty)
    )
    timings["write_ms"] = _ms(write_start)
    timings["total_ms"] = _ms(start)
    if result.rejected:
        raise ApiError(
            422,
            "document_rejected",
            f"an index refused these documents ({result.rejected}); they were removed from "
            "both indexes: fix and send them again",
        )
    if not result.pending:
        INGESTED_CHUNKS.inc(len(chunks))
    log.info(
        "ingested",
        extra={
            "collection": collection,
            "documents": len(documents),
            "chunks": len(chunks),
            "pending": sorted(result.pending),
            **timings,
        },
    )
    response = IngestResponse(
        collection=collection,
        documents=len({d.id for d in documents}),
        chunks=len(chunks),
        timings=timings,
    )
    return Ingested(response, result)


async def _write(rt: Runtime, collection: str, op: WriteOp) -> WriteResult:
    try:
        return await rt.writer.write(collection, op)
    except JournalFull as exc:
        raise ApiError(
            503, "index_unavailable", f"{exc}; try again later", {"Retry-After": "30"}
        ) from exc


def _pending_error(result: WriteResult) -> ApiError:
    stores = " and ".join(sorted(result.pending))
    return ApiError(
        503,
        "index_write_pending",
        f"the {stores} index could not be written now; the write is journaled and will be "
        "applied automatically when it is back (retrying is also safe)",
        {"Retry-After": "5"},
    )


async def ingest(rt: Runtime, collection: str, documents: list[DocumentIn]) -> IngestResponse:
    ingested = await write_documents(rt, collection, documents)
    if ingested.write.pending:
        raise _pending_error(ingested.write)
    return ingested.response


async def delete_document(rt: Runtime, collection: str, doc_id: str) -> bool:
    """True when the document existed (in either store) and is now gone from both."""
    known = await asyncio.gather(
        *(index.has_collection(collection) for index in rt.writer.stores.values() if index),
        return_exceptions=True,
    )
    journaled = await asyncio.to_thread(rt.writer.journal.count, collection)
    if known and all(k is False for k in known) and not journaled:
        raise ApiError(404, "collection_not_found", f"collection {collection!r} does not exist")
    result = await _write(rt, collection, WriteOp(delete_doc_ids=[doc_id]))
    if result.pending:
        raise _pending_error(result)
    return max(result.removed.values(), default=0) > 0


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
