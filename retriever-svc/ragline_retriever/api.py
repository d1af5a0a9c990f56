"""HTTP routes of retriever-svc (internal API; the gateway is the only intended caller)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from ragline_common.errors import ApiError
from ragline_common.responses import JsonResponse
from ragline_common.wire import (
    COLLECTION_PATTERN,
    DOC_ID_PATTERN,
    CollectionInfo,
    CollectionsResponse,
    DeleteResponse,
    IngestRequest,
    IngestResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from ragline_retriever import ingest as ingesting
from ragline_retriever.runtime import Runtime
from ragline_retriever.search import retrieve

router = APIRouter()

CollectionPath = Annotated[str, Path(pattern=COLLECTION_PATTERN)]
DocIdPath = Annotated[str, Path(pattern=DOC_ID_PATTERN)]


def runtime(request: Request) -> Runtime:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready:
        raise ApiError(503, "not_ready", "retriever is starting", {"Retry-After": "5"})
    return rt


@router.post("/v1/retrieve", response_model=RetrieveResponse)
async def post_retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
    return await retrieve(runtime(request), body)


@router.post("/v1/collections/{collection}/documents", response_model=IngestResponse)
async def post_documents(
    collection: CollectionPath, body: IngestRequest, request: Request
) -> IngestResponse:
    return await ingesting.ingest(runtime(request), collection, body.documents)


@router.delete(
    "/v1/collections/{collection}/documents/{doc_id:path}", response_model=DeleteResponse
)
async def delete_document(
    collection: CollectionPath, doc_id: DocIdPath, request: Request
) -> DeleteResponse:
    deleted = await ingesting.delete_document(runtime(request), collection, doc_id)
    return DeleteResponse(collection=collection, doc_id=doc_id, deleted=deleted)


@router.get("/v1/collections", response_model=CollectionsResponse)
async def get_collections(request: Request) -> CollectionsResponse:
    counts = await ingesting.list_collections(runtime(request))
    return CollectionsResponse(
        collections=[CollectionInfo(name=name, chunks=n) for name, n in counts.items()]
    )


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JsonResponse:
    """200 once the model is loaded and at least one index answers; 503 otherwise.

    One index down is "degraded", not "not ready": taking every replica out of the load
    balancer because Elasticsearch is down would turn a degraded answer into no answer.
    """
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready or rt.dense is None:
        return JsonResponse({"status": "starting"}, status_code=503)
    lexical_ok, dense_ok = await asyncio.gather(rt.lexical.healthy(), rt.dense.healthy())
    backends: dict[str, Any] = {
        "lexical": {"backend": rt.lexical.name, "ok": lexical_ok},
        "dense": {"backend": rt.dense.name, "ok": dense_ok},
        "embedding": {
            "model": rt.embedder.model_name,
            "device": rt.embedder.device,
            "ok": rt.embedder.ready,
        },
    }
    degraded = [role for role, ok in (("lexical", lexical_ok), ("dense", dense_ok)) if not ok]
    if len(degraded) == 2 or not rt.embedder.ready:
        return JsonResponse({"status": "unavailable", "backends": backends}, status_code=503)
    status = "degraded" if degraded else "ready"
    return JsonResponse({"status": status, "degraded": degraded, "backends": backends})
