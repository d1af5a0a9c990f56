"""A file upload (raw body plus query parameters) turned into one document to ingest.

Parsing runs before the job is created, in a worker thread (a large PDF takes a while),
so an unreadable file is a 422 on the upload rather than a failed job found later.
"""

from __future__ import annotations

import asyncio

import orjson
from pydantic import ValidationError

from ragline_common.errors import ApiError
from ragline_common.wire import (
    MAX_DOCUMENT_CHARS,
    MAX_TITLE_CHARS,
    DocumentIn,
    doc_id_from_name,
)
from ragline_retriever.parsing import UnsupportedDocument, detect_format, parse_document


async def document_from_upload(
    data: bytes,
    *,
    content_type: str,
    filename: str,
    doc_id: str | None,
    title: str | None,
    url: str,
    source: str | None,
    metadata: str,
) -> DocumentIn:
    if not data:
        raise ApiError(422, "empty_document", "the request body (the file) is empty")
    if not filename and not doc_id:
        raise ApiError(422, "invalid_request", "give a filename or an id for the document")
    try:
        fmt = detect_format(filename, content_type.split(";")[0].strip().lower())
        parsed = await asyncio.to_thread(parse_document, data, fmt)
    except UnsupportedDocument as exc:
        raise ApiError(422, "unsupported_document", str(exc)) from exc
    if len(parsed.text) > MAX_DOCUMENT_CHARS:
        raise ApiError(
            413,
            "document_too_large",
            f"the file holds {len(parsed.text)} characters of text; the limit is "
            f"{MAX_DOCUMENT_CHARS}: split it",
        )
    try:
        meta = orjson.loads(metadata)
    except orjson.JSONDecodeError as exc:
        raise ApiError(422, "invalid_request", "metadata must be a JSON object") from exc
    try:
        return DocumentIn(
            id=doc_id or doc_id_from_name(filename),
            text=parsed.text,
            title=title if title is not None else parsed.title[:MAX_TITLE_CHARS],
            url=url,
            source=source if source is not None else filename,
            metadata=meta,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, "invalid_request", problems[:1000]) from exc
