"""Compare the two stores of a collection chunk id by chunk id.

The journal makes a half-done write converge; this is how an operator checks that it did
(and finds damage the journal cannot know about: a store restored from an old backup, a
write made behind the service's back, a replica that crashed with its journal on an
ephemeral disk).
"""

from __future__ import annotations

import asyncio

from ragline_common.errors import ApiError
from ragline_retriever.backends.base import CollectionNotFound
from ragline_retriever.leases import LeaseBusy
from ragline_retriever.protocol import MAX_LISTED_IDS, VerifyReport
from ragline_retriever.runtime import Runtime


async def verify(rt: Runtime, collection: str) -> VerifyReport:
    if rt.dense is None:
        raise ApiError(503, "index_unavailable", "the dense index is not open")
    try:
        # Not in the middle of a write, on this replica or another.
        async with rt.writer.exclusive(collection, rt.settings.write_timeout_s):
            results = await asyncio.gather(
                asyncio.wait_for(rt.lexical.chunk_ids(collection), rt.settings.write_timeout_s),
                asyncio.wait_for(rt.dense.chunk_ids(collection), rt.settings.write_timeout_s),
                return_exceptions=True,
            )
            pending = await asyncio.to_thread(rt.writer.journal.count, collection)
    except LeaseBusy as exc:
        raise ApiError(
            503, "index_busy", "another replica is writing this collection; try again"
        ) from exc
    found: list[set[str]] = []
    for store, result in zip(("lexical", "dense"), results, strict=True):
        if isinstance(result, CollectionNotFound):
            found.append(set())
        elif isinstance(result, BaseException):
            raise ApiError(
                503, "index_unavailable", f"the {store} index could not be read: {result}"
            )
        else:
            found.append(result)
    searched = results[1:] if rt.lexical.name == "none" else results
    if all(isinstance(r, CollectionNotFound) for r in searched) and not pending:
        raise ApiError(404, "collection_not_found", f"collection {collection!r} does not exist")
    lexical, dense = found
    only_lexical, only_dense = sorted(lexical - dense), sorted(dense - lexical)
    if rt.lexical.name == "none":  # dense only: nothing to compare it with
        only_lexical, only_dense = [], []
    return VerifyReport(
        collection=collection,
        consistent=not only_lexical and not only_dense and not pending,
        lexical_chunks=len(lexical),
        dense_chunks=len(dense),
        only_in_lexical=only_lexical[:MAX_LISTED_IDS],
        only_in_dense=only_dense[:MAX_LISTED_IDS],
        only_in_lexical_count=len(only_lexical),
        only_in_dense_count=len(only_dense),
        pending_writes=pending,
    )
