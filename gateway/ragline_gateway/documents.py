"""Document management (`/api/collections/...`, `/api/jobs/...`), passed through to
retriever-svc's `/v1/...` routes.

The retriever validates these bodies and owns their errors, so its status, body and the
headers a client needs (`Location` of a job, `Retry-After`) come back unchanged; path
parameters are checked here so that nothing unexpected reaches the internal API. The
admin scope these routes need arrives with authentication (issue 5's `admission.py`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import AfterValidator

from ragline_common.errors import ApiError
from ragline_common.wire import COLLECTION_PATTERN, DOC_ID_PATTERN, check_doc_id
from ragline_gateway.clients.base import UpstreamError

router = APIRouter(prefix="/api")

Collection = Annotated[str, Path(pattern=COLLECTION_PATTERN)]
DocId = Annotated[str, Path(pattern=DOC_ID_PATTERN), AfterValidator(check_doc_id)]
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]

# Ingest and verify read or write whole collections: give them time.
_TIMEOUT_S = 300.0
_PASSED_HEADERS = ("retry-after",)


async def _pass(request: Request, path: str) -> Response:
    retriever = request.app.state.retriever
    try:
        upstream = await retriever.forward(
            request.method,
            path,
            list(request.query_params.multi_items()),
            await request.body(),
            request.headers.get("content-type"),
            _TIMEOUT_S,
        )
    except UpstreamError as exc:
        raise ApiError(503, "retriever_unavailable", "the document index is unavailable") from exc
    if upstream.status_code >= 500 and "application/json" not in upstream.headers.get(
        "content-type", ""
    ):
        raise ApiError(503, "retriever_unavailable", "the document index is unavailable")
    headers = {k: upstream.headers[k] for k in _PASSED_HEADERS if k in upstream.headers}
    location = upstream.headers.get("location", "")
    if location.startswith("/v1/"):
        headers["location"] = "/api/" + location[len("/v1/") :]
    return Response(
        upstream.content,
        status_code=upstream.status_code,
        headers=headers,
        media_type=upstream.headers.get("content-type", "application/json"),
    )


@router.get("/collections")
async def list_collections(request: Request) -> Response:
    return await _pass(request, "/v1/collections")


@router.post("/collections/{collection}/documents")
async def ingest(collection: Collection, request: Request) -> Response:
    """Up to 256 documents, written before the answer (JSON `{documents: [...]}`)."""
    return await _pass(request, f"/v1/collections/{collection}/documents")


@router.post("/collections/{collection}/jobs", status_code=202)
async def ingest_job(collection: Collection, request: Request) -> Response:
    """Up to 10,000 documents as a background job: 202 with the job to poll."""
    return await _pass(request, f"/v1/collections/{collection}/jobs")


@router.post("/collections/{collection}/files", status_code=202)
async def ingest_file(collection: Collection, request: Request) -> Response:
    """One text, Markdown, HTML or PDF file as the raw body: 202 with the job to poll."""
    return await _pass(request, f"/v1/collections/{collection}/files")


@router.delete("/collections/{collection}/documents/{doc_id:path}")
async def delete_document(collection: Collection, doc_id: DocId, request: Request) -> Response:
    return await _pass(request, f"/v1/collections/{collection}/documents/{doc_id}")


@router.get("/collections/{collection}/verify")
async def verify(collection: Collection, request: Request) -> Response:
    """Compares the lexical and dense stores of a collection chunk id by chunk id."""
    return await _pass(request, f"/v1/collections/{collection}/verify")


@router.get("/jobs")
async def list_jobs(request: Request) -> Response:
    return await _pass(request, "/v1/jobs")


@router.get("/jobs/{job_id}")
async def get_job(job_id: JobId, request: Request) -> Response:
    return await _pass(request, f"/v1/jobs/{job_id}")


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: JobId, request: Request) -> Response:
    return await _pass(request, f"/v1/jobs/{job_id}")
