"""HTTP routes of retriever-svc (internal API; the gateway is the only intended caller)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import AfterValidator

from ragline_common import routing  # noqa: F401  (the `doc_id` path convertor)
from ragline_common.errors import ApiError
from ragline_common.responses import JsonResponse
from ragline_common.wire import (
    COLLECTION_PATTERN,
    MAX_DOC_ID_BYTES,
    CollectionInfo,
    CollectionsResponse,
    DeleteResponse,
    IngestRequest,
    IngestResponse,
    RetrieveRequest,
    RetrieveResponse,
    check_doc_id,
    check_optional_doc_id,
)
from ragline_retriever import ingest as ingesting
from ragline_retriever import uploads
from ragline_retriever.protocol import (
    CollectionVersion,
    IngestJobRequest,
    Job,
    JobsResponse,
    VerifyReport,
)
from ragline_retriever.runtime import Runtime
from ragline_retriever.search import retrieve
from ragline_retriever.verify import verify

router = APIRouter()

CollectionPath = Annotated[str, Path(pattern=COLLECTION_PATTERN)]
# Percent-encoded as one path segment (ragline_common.wire.doc_id_path), decoded once.
DocIdPath = Annotated[
    str, Path(min_length=1, max_length=MAX_DOC_ID_BYTES), AfterValidator(check_doc_id)
]
JobIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


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
    "/v1/collections/{collection}/documents/{doc_id:doc_id}", response_model=DeleteResponse
)
async def delete_document(
    collection: CollectionPath, doc_id: DocIdPath, request: Request
) -> DeleteResponse:
    deleted = await ingesting.delete_document(runtime(request), collection, doc_id)
    return DeleteResponse(collection=collection, doc_id=doc_id, deleted=deleted)


@router.post("/v1/collections/{collection}/jobs", response_model=Job, status_code=202)
async def post_job(
    collection: CollectionPath, body: IngestJobRequest, request: Request
) -> JsonResponse:
    job = await runtime(request).jobs.submit(collection, body.documents)
    return _accepted(job)


@router.post("/v1/collections/{collection}/files", response_model=Job, status_code=202)
async def post_file(
    collection: CollectionPath,
    request: Request,
    filename: Annotated[str, Query(max_length=1000)] = "",
    id: Annotated[
        str | None, Query(max_length=MAX_DOC_ID_BYTES), AfterValidator(check_optional_doc_id)
    ] = None,
    title: Annotated[str | None, Query(max_length=1000)] = None,
    url: Annotated[str, Query(max_length=2000)] = "",
    source: Annotated[str | None, Query(max_length=1000)] = None,
    metadata: Annotated[str, Query(max_length=20_000)] = "{}",
) -> JsonResponse:
    """One file as the raw request body (text, Markdown, HTML or PDF, by Content-Type or
    file name), parsed here so a bad file is a 422 now, then ingested as a job."""
    rt = runtime(request)
    document = await uploads.document_from_upload(
        await request.body(),
        content_type=request.headers.get("content-type", ""),
        filename=filename,
        doc_id=id,
        title=title,
        url=url,
        source=source,
        metadata=metadata,
    )
    return _accepted(await rt.jobs.submit(collection, [document]))


def _accepted(job: Job) -> JsonResponse:
    return JsonResponse(
        job.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.job_id}"}
    )


@router.get("/v1/jobs", response_model=JobsResponse)
async def list_jobs(
    request: Request,
    collection: Annotated[str | None, Query(pattern=COLLECTION_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobsResponse:
    store = runtime(request).jobs.store
    return JobsResponse(jobs=await asyncio.to_thread(store.list, collection, limit))


@router.get("/v1/jobs/{job_id}", response_model=Job)
async def get_job(job_id: JobIdPath, request: Request) -> Job:
    job = await asyncio.to_thread(runtime(request).jobs.store.get, job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


@router.delete("/v1/jobs/{job_id}", response_model=Job)
async def cancel_job(job_id: JobIdPath, request: Request) -> Job:
    job = await runtime(request).jobs.cancel(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


@router.get("/v1/collections/{collection}/verify", response_model=VerifyReport)
async def get_verify(collection: CollectionPath, request: Request) -> VerifyReport:
    return await verify(runtime(request), collection)


@router.get("/v1/collections/{collection}/version", response_model=CollectionVersion)
async def get_version(collection: CollectionPath, request: Request) -> CollectionVersion:
    """The collection's index version, for keying cached answers: it changes after every
    write a store applies, so read it before searching. From memory: cheap on every
    question. A collection never written is a valid key too (counter 0)."""
    version = await runtime(request).index_version(collection)
    return CollectionVersion(collection=collection, version=version)


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
    if getattr(request.app.state, "draining", False):  # SIGTERM: leave the load balancer
        return JsonResponse({"status": "draining"}, status_code=503)
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
