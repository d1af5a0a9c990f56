"""The engine interface that serving.py drives.

An engine turns a `GenerationRequest` into an async stream of `GenerationDelta`s. The last
delta carries `finish_reason`. Closing or cancelling the stream before that (the client
went away: Starlette cancels the response generator) must stop the generation in the
engine; serving.py closes the stream and counts the abort in
`ragline_generation_aborts_total`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import Counter

from ragline_common.wire import ChatMessage, ReasoningEffort, ResponseFormat

FinishReason = Literal["stop", "length", "abort"]

GENERATION_ABORTS = Counter(
    "ragline_generation_aborts_total",
    "Generations aborted in the engine because the client went away",
    ["engine"],
)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. A sampling field left None means "the engine's default" (for vLLM:
    the model's generation config, else OpenAI's neutral value), as in `vllm serve`."""

    request_id: str
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extensions of the OpenAI request, accepted by `vllm serve` as well.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    # Token id -> bias in [-100, 100], as OpenAI and vLLM take it.
    logit_bias: dict[int, float] | None = None
    # None or type `text`: free text. An engine that cannot honour a JSON format raises
    # an ApiError (400) before its first delta rather than answer in prose.
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None  # a chat-template variable


@dataclass(frozen=True)
class GenerationDelta:
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # totals so far, not increments
    completion_tokens: int = 0


class Engine(Protocol):
    name: str  # engine kind, the `engine` label of metrics
    model_name: str

    @property
    def ready(self) -> bool: ...

    @property
    def dead(self) -> bool:
        """Started once and failed for good: only a restart brings it back (liveness)."""
        ...

    def unfinished_requests(self) -> int:
        """Generations the engine holds right now (running or queued). Exported as the
        `ragline_llm_engine_requests` gauge, so that it can be seen that a client that
        left freed its place in the engine at once."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """An async generator; raises `ragline_common.errors.ApiError` for a bad request
        (e.g. prompt too long) before its first delta."""
        ...


class LocalEngine:
    """What an engine with nothing to load and nothing to lose shares (the extractive and
    fixed engines): ready once started, never dead, and a count of the streams it serves,
    which `stream` keeps."""

    def __init__(self) -> None:
        self._ready = False
        self._active = 0

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def dead(self) -> bool:
        return False

    def unfinished_requests(self) -> int:
        return self._active

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False
