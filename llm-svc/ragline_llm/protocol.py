"""OpenAI Chat Completions wire models (the subset llm-svc serves), after vLLM's protocol.py.

Unknown request fields are ignored, as OpenAI-compatible servers do, so stock SDKs work.
Every input is bounded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragline_common.wire import ChatMessage, LogitBias, ReasoningEffort, ResponseFormat

MAX_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_TOKENS_BOUND = 32_768


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = 1
    user: str | None = None
    # Used as vLLM uses them: logit_bias and min_p in sampling, response_format as
    # structured-output decoding, reasoning_effort as a chat-template variable. The
    # extractive engine ignores what does not apply to it and refuses a JSON
    # response_format (it writes no JSON).
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's extensions, accepted as `vllm serve` accepts them.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_BOUND)
    ignore_eos: bool = False
    # Parsed only to refuse them with a clear 400 rather than silently answer without.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first requested feature this server does not provide, named for the 400.
        Tools are refused unless `tool_choice` is "none", as `vllm serve` without a tool
        parser does (tools with no tool_choice mean "auto" there)."""
        if self.n not in (None, 1):
            return "n: only n=1 is supported"
        if self.logprobs or self.top_logprobs:
            return "logprobs are not supported"
        if self.tools and self.tool_choice != "none":
            return "tools are not supported (tool_choice 'none' only)"
        return None

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragline"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
