"""Public wire models of the gateway: the native `/api/chat` body and the OpenAI-compatible
chat request with ragline's optional extra fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, model_validator

from ragline_common.wire import (
    CONVERSATION_ID_PATTERN,
    CollectionName,
    Filters,
    LogitBias,
    ReasoningEffort,
    ResponseFormat,
)

ConversationId = Annotated[str, StringConstraints(pattern=CONVERSATION_ID_PATTERN)]


class EncodableRequest(BaseModel):
    """JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which Python accepts as a
    str but no UTF-8 encoder does: refuse it here (422) rather than fail (500) when the
    question is sent on to the upstream services."""

    @model_validator(mode="after")
    def _encodable(self) -> Self:
        try:
            orjson.dumps(self.model_dump())
        except TypeError:
            raise ValueError("the request holds text that is not valid Unicode") from None
        return self


class ChatRequest(EncodableRequest):
    """Body of `POST /api/chat`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    message: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    conversation_id: ConversationId | None = None
    collection: CollectionName | None = None
    filters: Filters = Field(default_factory=dict, max_length=16)
    top_k: int | None = Field(default=None, ge=1)
    # The relevance cut-off of this answer (CUTOFF_FIELDS below).
    source_max_drop: float | None = Field(default=None, ge=0)
    source_min_score: float | None = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # OpenAI allows content parts; text parts are joined, others are refused.
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class OpenAIChatRequest(EncodableRequest):
    """OpenAI Chat Completions request, with ragline's extra fields. Every field is used,
    accepted and ignored, or refused by the written policy in openai_policy.py; fields not
    declared here are accepted and ignored, as vLLM's own server does with fields it does
    not know (`model_extra`)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=200)
    # Strict: pydantic's lax mode would read "yes", "off" or 1 as a boolean, so a client's
    # typo could silently switch between a stream and one JSON response.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None  # only 1 is supported: anything else is refused
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI's limit too
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's sampling extensions (`top_k` is ragline's passage count, not vLLM's top-k).
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0, le=8192)
    # Tools: ragline answers from documents and calls none. Chat UIs send their tools
    # with every chat; only a request that demands a call is refused.
    tools: list[Any] | None = Field(default=None, max_length=256)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None  # legacy tools
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    # ragline extras
    collection: CollectionName | None = None
    filters: Filters = Field(default_factory=dict, max_length=16)
    top_k: int | None = Field(default=None, ge=1)
    # The relevance cut-off of this answer (CUTOFF_FIELDS below).
    source_max_drop: float | None = Field(default=None, ge=0)
    source_min_score: float | None = None
    conversation_id: ConversationId | None = None
    # NVIDIA's RAG server's switch: false sends the conversation straight to the
    # generation model (no retrieval, no sources). Unset: on, unless `model` names the
    # generation model itself.
    use_knowledge_base: StrictBool | None = None


# Per-request relevance cut-off (ranking.py), on the score scale of the ranking in use
# (/readyz says which): sources more than `source_max_drop` below the top one, or scoring
# under `source_min_score`, are left out; the top source always stays.
CUTOFF_FIELDS = ("source_max_drop", "source_min_score")


def cutoff_overrides(body: ChatRequest | OpenAIChatRequest) -> dict[str, float | None]:
    """The cut-off rules a request sets, by `Cutoff` field name: a number sets the rule
    for this answer, `null` turns it off, absent keeps the ranking's default."""
    return {
        name.removeprefix("source_"): getattr(body, name)
        for name in CUTOFF_FIELDS
        if name in body.model_fields_set
    }
