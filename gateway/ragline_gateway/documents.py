"""Document management (`/api/collections/...`, `/api/jobs/...`), passed through to
retriever-svc's `/v1/...` routes.

The retriever validates these bodies and owns their errors, so its status, body and the
headers a client needs (`Location` of a job, `Retry-After`) come back unchanged; path
parameters are checked here so that nothing unexpected reaches the internal API. The
admin scope these routes need arrives with authentication (issue 5's `admission.py`).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import AfterValidator

from ragline_common import routing  # noqa: F401  (the `doc_id` path convertor)
from ragline_common.errors import ApiError
from ragline_common.responses import JsonResponse
from ragline_common.wire import (
    COLLECTION_PATTERN,
    MAX_DOC_ID_BYTES,
    check_doc_id,
    doc_id_path,
)
from ragline_gateway.admission import admin_caller, admin_reader
from ragline_gateway.auth import Caller
from ragline_gateway.clients.base import UpstreamError

router = APIRouter(prefix="/api")
Admin = Annotated[Caller, Depends(admin_caller)]
# Cheap reads a client polls (job progress, the lists): not charged to the key's rate.
AdminRead = Annotated[Caller, Depends(admin_reader)]

Collection = Annotated[str, Path(pattern=COLLECTION_PATTERN)]
# The id arrives percent-encoded as one path segment (`/` as %2F; a client that leaves its
# slashes plain reaches the same route), decoded once by the server: any valid document id
# (ragline_common.wire), checked here so nothing else reaches the internal API.
DocId = Annotated[
    str, Path(min_length=1, max_length=MAX_DOC_ID_BYTES), AfterValidator(check_doc_id)
]
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]

# Ingest and verify read or write whole collections: give them time.
_TIMEOUT_S = 300.0
_PASSED_HEADERS = ("retry-after",)


def retriever_unavailable() -> ApiError:
    # Retry-After as on every 503 of a dependency (README): the gateway re-probes the
    # retriever every second, so a retry soon is likely to get through.
    return ApiError(
        503,
        "retriever_unavailable",
        "the document index is unavailable",
        headers={"Retry-After": "5"},
    )


async def _pass(request: Request, path: str, method: str | None = None) -> Response:
    retriever = request.app.state.retriever
    try:
        upstream = await retriever.forward(
            method or request.method,
            path,
            list(request.query_params.multi_items()),
            await request.body() if method is None else b"",
            request.headers.get("content-type"),
            _TIMEOUT_S,
        )
    except UpstreamError as exc:
        raise retriever_unavailable() from exc
    if upstream.status_code >= 500 and "application/json" not in upstream.headers.get(
        "content-type", ""
    ):
        raise retriever_unavailable()
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


def _json(response: Response) -> Any:
    return orjson.loads(bytes(response.body))


async def _owned_job(request: Request, caller: Caller, job_id: str) -> Response:
    """The job, or 404 when it belongs to a collection this key does not reach."""
    upstream = await _pass(request, f"/v1/jobs/{job_id}", method="GET")
    if upstream.status_code == 200 and not caller.may_read(_json(upstream)["collection"]):
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return upstream


@router.get("/collections")
async def list_collections(request: Request, caller: AdminRead) -> Response:
    upstream = await _pass(request, "/v1/collections")
    if upstream.status_code != 200:
        return upstream
    body = _json(upstream)
    body["collections"] = [c for c in body["collections"] if caller.may_read(c["name"])]
    return JsonResponse(body)


@router.post("/collections/{collection}/documents")
async def ingest(collection: Collection, request: Request, caller: Admin) -> Response:
    """Up to 256 documents, written before the answer (JSON `{documents: [...]}`)."""
    caller.collection(collection)
    return await _pass(request, f"/v1/collections/{collection}/documents")


@router.post("/collections/{collection}/jobs", status_code=202)
async def ingest_job(collection: Collection, request: Request, caller: Admin) -> Response:
    """Up to 10,000 documents as a background job: 202 with the job to poll."""
    caller.collection(collection)
    return await _pass(request, f"/v1/collections/{collection}/jobs")


@router.post("/collections/{collection}/files", status_code=202)
async def ingest_file(collection: Collection, request: Request, caller: Admin) -> Response:
    """One text, Markdown, HTML or PDF file as the raw body: 202 with the job to poll."""
    caller.collection(collection)
    return await _pass(request, f"/v1/collections/{collection}/files")


@router.delete("/collections/{collection}/documents/{doc_id:doc_id}")
async def delete_document(
    collection: Collection, doc_id: DocId, request: Request, caller: Admin
) -> Response:
    caller.collection(collection)
    # Encoded again, whole, by us: `/`, `%`, `?`, `#` in an id stay part of the id.
    return await _pass(request, f"/v1/collections/{collection}/documents/{doc_id_path(doc_id)}")


@router.get("/collections/{collection}/verify")
async def verify(collection: Collection, request: Request, caller: Admin) -> Response:
    """Compares the lexical and dense stores of a collection chunk id by chunk id."""
    caller.collection(collection)
    return await _pass(request, f"/v1/collections/{collection}/verify")


@router.get("/jobs")
async def list_jobs(request: Request, caller: AdminRead) -> Response:
    upstream = await _pass(request, "/v1/jobs")
    if upstream.status_code != 200:
        return upstream
    body = _json(upstream)
    body["jobs"] = [j for j in body["jobs"] if caller.may_read(j["collection"])]
    return JsonResponse(body)


@router.get("/jobs/{job_id}")
async def get_job(job_id: JobId, request: Request, caller: AdminRead) -> Response:
    return await _owned_job(request, caller, job_id)


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: JobId, request: Request, caller: Admin) -> Response:
    await _owned_job(request, caller, job_id)
    return await _pass(request, f"/v1/jobs/{job_id}")
