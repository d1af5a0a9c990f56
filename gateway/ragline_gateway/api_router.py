"""HTTP only: parse and bound the input, admit, run the pipeline, render. The logic lives
in pipeline.py; the wire formats in streaming.py."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ragline_common.disconnects import unless_disconnected
from ragline_common.errors import ApiError
from ragline_common.responses import JsonResponse
from ragline_common.wire import COLLECTION_PATTERN, CONVERSATION_ID_PATTERN
from ragline_gateway import openai_policy
from ragline_gateway.admission import Admission, Ticket, chat_caller
from ragline_gateway.auth import Caller
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.memory import Turn
from ragline_gateway.openwebui import wants_source_events
from ragline_gateway.pipeline import AnswerPipeline, PreparedAnswer, Question
from ragline_gateway.protocol import ChatRequest, OpenAIChatRequest, cutoff_overrides
from ragline_gateway.settings import GatewaySettings
from ragline_gateway.streaming import AnswerResponse, OpenAIChunks, native_sse, openai_completion

router = APIRouter()
log = logging.getLogger("ragline.api")


def _valid(pattern: str, value: str) -> bool:
    """The whole value matches: `re.match` with `$` would accept a trailing newline."""
    return re.fullmatch(pattern, value) is not None


DEFAULT_MODEL = "ragline"


def _state(request: Request) -> tuple[GatewaySettings, AnswerPipeline, Admission]:
    app = request.app.state
    return app.settings, app.pipeline, app.admission


def _check_question(settings: GatewaySettings, text: str, top_k: int | None) -> None:
    if not text.strip():
        raise ApiError(422, "invalid_request", "the question is empty")
    if len(text) > settings.max_question_chars:
        raise ApiError(
            422, "question_too_long",
            f"the question has {len(text)} characters; the limit is {settings.max_question_chars}",
        )  # fmt: skip
    if top_k is not None and top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k must be at most {settings.max_top_k}")


async def _prepare(pipeline: AnswerPipeline, ticket: Ticket, q: Question) -> PreparedAnswer:
    try:
        return await pipeline.prepare(q)
    except BaseException:
        await ticket.release()
        raise


def _respond(prepared: PreparedAnswer, ticket: Ticket, body: Any) -> AnswerResponse:
    async def on_close() -> None:
        await ticket.release()
        if prepared.stream is not None:
            await prepared.stream.aclose()

    return AnswerResponse(body, on_close)


@router.post("/api/chat")
async def chat(
    body: ChatRequest, request: Request, caller: Caller = Depends(chat_caller)
) -> Response:
    settings, pipeline, admission = _state(request)
    _check_question(settings, body.message, body.top_k)
    collection = caller.collection(body.collection)
    q = Question(
        text=body.message,
        collection=collection,
        endpoint="api_chat",
        tenant=caller.tenant,
        memory_scope=caller.conversation_scope(collection),
        filters=body.filters,
        top_k=body.top_k,
        cutoff=cutoff_overrides(body),
        conversation_id=body.conversation_id,
    )
    ticket = await admission.admit_stream(caller)
    prepared = await _prepare(pipeline, ticket, q)
    return _respond(prepared, ticket, native_sse(pipeline.events(prepared)))


async def _uses_knowledge_base(pipeline: AnswerPipeline, body: OpenAIChatRequest) -> bool:
    """`use_knowledge_base` when given; else on, unless `model` names the generation model
    (which wins over a collection of the same name; `collection` reaches that one)."""
    if body.use_knowledge_base is not None:
        return body.use_knowledge_base
    if body.model == DEFAULT_MODEL or body.collection is not None:
        return True
    return body.model != await pipeline.generation_model()


async def _openai_question(
    settings: GatewaySettings,
    pipeline: AnswerPipeline,
    body: OpenAIChatRequest,
    request: Request,
    caller: Caller,
) -> Question:
    refused = openai_policy.refusals(body)
    if refused:
        raise ApiError(
            400, "unsupported_parameter", f"unsupported parameters: {'; '.join(refused)}"
        )
    ignored = openai_policy.ignored_fields(body)
    if ignored:  # as vLLM logs them: at debug, since chat UIs send some with every request
        log.debug("OpenAI parameters accepted and ignored", extra={"fields": ignored})
    try:
        texts = [(m.role, m.text()) for m in body.messages]
    except ValueError as exc:
        raise ApiError(400, "unsupported_parameter", str(exc)) from exc
    options = openai_policy.generation_options(body)
    if not await _uses_knowledge_base(pipeline, body):
        return Question(
            text=texts[-1][1],
            collection="",
            endpoint="openai",
            tenant=caller.tenant,
            sampling=options,
            knowledge_base=False,
            messages=[{"role": role, "content": text} for role, text in texts],
        )
    if texts[-1][0] != "user":
        raise ApiError(422, "invalid_request", "the last message must be the user's question")
    question = texts[-1][1]
    _check_question(settings, question, body.top_k)
    # Earlier user/assistant pairs are the conversation so far.
    history: list[Turn] = []
    pending: str | None = None
    for role, text in texts[:-1]:
        if role == "user":
            pending = text
        elif role == "assistant" and pending is not None:
            history.append(Turn(pending, text))
            pending = None
    asked = body.collection or (body.model if body.model != DEFAULT_MODEL else None)
    if asked is not None and not _valid(COLLECTION_PATTERN, asked):
        raise ApiError(404, "collection_not_found", f"no model or collection named {asked!r}")
    conversation_id = body.conversation_id or request.headers.get("x-openwebui-chat-id") or None
    if conversation_id is not None and not _valid(CONVERSATION_ID_PATTERN, conversation_id):
        raise ApiError(422, "invalid_request", "the chat id header is not a valid conversation id")
    collection = caller.collection(asked)
    return Question(
        text=question,
        collection=collection,
        endpoint="openai",
        tenant=caller.tenant,
        memory_scope=caller.conversation_scope(collection),
        filters=body.filters,
        top_k=body.top_k,
        cutoff=cutoff_overrides(body),
        conversation_id=conversation_id,
        history=history,
        sampling=options,
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    body: OpenAIChatRequest, request: Request, caller: Caller = Depends(chat_caller)
) -> Response:
    settings, pipeline, admission = _state(request)
    q = await _openai_question(settings, pipeline, body, request, caller)
    source_events = wants_source_events(request.headers, settings.openai_source_events)
    ticket = await admission.admit_stream(caller)
    prepared = await _prepare(pipeline, ticket, q)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = OpenAIChunks(prepared, body.model, include_usage, source_events)
        return _respond(prepared, ticket, chunks.render(pipeline.events(prepared)))
    try:
        # A non-streamed answer sends nothing until its end: without watching for the
        # client's departure it would generate, holding its slot, for nobody.
        completion = await unless_disconnected(
            request, openai_completion(prepared, body.model, pipeline.events(prepared))
        )
    finally:
        await ticket.release()
    if completion is None:
        # Nobody to answer: the status is for the access log (nginx's "client closed").
        return Response(status_code=499)
    return JsonResponse(completion)


@router.get("/v1/models")
async def models(request: Request, caller: Caller = Depends(chat_caller)) -> dict[str, Any]:
    """`ragline` (the key's default collection), each collection this key may read, and
    the generation model itself (answers without the knowledge base: a chat UI's task
    model). The generation model is left out, not the list refused, while llm-svc cannot
    say its name."""
    try:
        names = await request.app.state.retriever.call("GET", "/v1/collections", 10.0)
    except UpstreamError as exc:
        raise ApiError(503, "retriever_unavailable", "the document index is unavailable") from exc
    collections = caller.visible(c["name"] for c in names.get("collections", []))
    try:
        generation = [await request.app.state.pipeline.generation_model()]
    except ApiError:
        generation = []
    listed = [DEFAULT_MODEL, *(c for c in collections if c not in generation), *generation]
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ragline"} for name in listed
        ],
    }


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    """Ready when the services an answer cannot do without answer; the reranker is optional
    (its loss degrades answers, it does not stop them). `ranking` says how sources are
    ordered and cut off now (ranking.py)."""
    state = request.app.state
    upstreams = {"retriever": state.retriever, "llm": state.llm, "reranker": state.reranker}

    async def probe(client: Any) -> bool:
        try:
            payload = await client.call("GET", client.health_path, 2.0)
        except UpstreamError:
            return False
        client.observe_health(200, payload)
        return True

    results = dict(
        zip(upstreams, await asyncio.gather(*(probe(c) for c in upstreams.values())), strict=True)
    )
    ready = results["retriever"] and results["llm"] and not state.draining
    return JsonResponse(
        {
            "status": "ready" if ready else "not_ready",
            "upstreams": results,
            "ranking": state.pipeline.ranking_status(),
        },
        status_code=200 if ready else 503,
    )
