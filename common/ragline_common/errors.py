"""The one error envelope of ARCHITECTURE.md: `{"error": {"code", "message", "request_id"}}`.

Every service installs these handlers so that a client never sees a stack trace, a bare
string, or FastAPI's default `{"detail": ...}` shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragline_common.logs import request_id_var
from ragline_common.responses import JsonResponse

log = logging.getLogger("ragline.errors")


class ApiError(Exception):
    """An error meant for the client: a status, a stable machine-readable code, a message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message, "request_id": request_id_var.get()}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse(error_body(code, message), status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _describe_validation(request: Request, exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            return 400, "invalid_json", "request body is not valid JSON"
    # FastAPI parses a body as JSON only when it is declared so; anything else (curl -d
    # sends application/x-www-form-urlencoded) reaches validation as raw bytes and would
    # read "Input should be a valid dictionary": say what is really wrong.
    content_type = request.headers.get("content-type", "")
    if isinstance(exc.body, bytes | bytearray) and not _is_json(content_type):
        return (
            415,
            "unsupported_media_type",
            f"the body must be JSON sent with Content-Type: application/json "
            f"(got {content_type or 'no Content-Type'})",
        )
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JsonResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JsonResponse:
        status, code, message = _describe_validation(request, exc)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JsonResponse:
        # FastAPI turns a JSON body it cannot decode for any reason but a syntax error
        # (bytes that are not UTF-8, nesting deeper than the parser recurses) into a bare
        # 400 "There was an error parsing the body": to a client that is invalid JSON too.
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return error_response(400, "invalid_json", "request body is not valid UTF-8 JSON")
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            return error_response(400, "invalid_json", "request body JSON is nested too deeply")
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        # 405 carries `Allow` (RFC 9110); keep whatever headers the exception names.
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JsonResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the service log")
