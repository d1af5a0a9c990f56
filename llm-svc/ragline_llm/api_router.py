"""HTTP only: routes, SSE framing and headers. The logic lives in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ragline_common.disconnects import unless_disconnected
from ragline_common.errors import error_response
from ragline_common.responses import JsonResponse
from ragline_llm.protocol import ChatCompletionRequest
from ragline_llm.serving import ChatServing, ChatStream

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SseResponse(StreamingResponse):
    """`text/event-stream` whose body is always closed when the response ends, even when
    the client left before the first frame (which is how an abort gets counted)."""

    media_type = "text/event-stream"

    def __init__(self, stream: ChatStream) -> None:
        super().__init__(stream, headers=SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


def _serving(request: Request) -> ChatServing:
    return request.app.state.serving


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    serving = _serving(request)
    work = serving.stream(body) if body.stream else serving.complete(body)
    result = await unless_disconnected(request, work)
    if result is None:  # nobody is listening; the status is for the access log only
        return error_response(499, "client_closed", "client closed the request")
    return SseResponse(result) if body.stream else JsonResponse(result)


@router.get("/v1/models")
async def models(request: Request) -> JsonResponse:
    return JsonResponse(_serving(request).models())


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JsonResponse:
    if getattr(request.app.state, "draining", False):  # SIGTERM: leave the load balancer
        return error_response(503, "draining", "service shutting down")
    serving: ChatServing | None = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.ready:
        return error_response(503, "not_ready", "engine not started or service draining")
    return JsonResponse(
        {"status": "ready", "engine": serving.engine.name, "model": serving.engine.model_name}
    )
