"""reranker-svc settings: environment variables prefixed `RAGLINE_RERANKER_`.

The README's configuration table lists every one; a bad value fails at start-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragline_common.settings import ServiceSettings

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class RerankerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_RERANKER_", extra="ignore")

    port: int = 8002
    # A cross-encoder checkpoint (hub id or local path). Empty: no cross-encoder weights,
    # score with the packaged bi-encoder (all-MiniLM-L6-v2) and say so in logs and /readyz
    # (`scorer: bi-encoder`), from which the gateway's `auto` ranking learns to rank by the
    # retriever's own scores instead of calling this service.
    model: str = ""
    # auto: cross-encoder when `model` is set, else bi-encoder.
    scorer: Literal["auto", "cross-encoder", "bi-encoder"] = "auto"
    # Bi-encoder weights; empty means the packaged all-MiniLM-L6-v2.
    bi_encoder_model: str = ""
    # auto: the first CUDA device when torch sees one, else cpu. `cuda:N` picks a device.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: float16 on CUDA, float32 on CPU.
    dtype: Dtype = "auto"
    # Tokens per (query, document) pair; longer pairs are truncated (the document first).
    # Unset: the model's own limit. A value above the model's limit is lowered to it.
    max_length: int | None = Field(default=None, ge=8, le=32_768)
    # One forward pass holds at most this many tokens, counted padded: the longest pair in
    # the pass times the number of pairs (what the model really computes). Unset: 16384
    # on CUDA (big passes keep the GPU busy), 2048 on CPU (compute grows with padded
    # tokens there, so smaller, length-sorted passes waste less).
    max_batch_tokens: int | None = Field(default=None, ge=64)
    max_batch_pairs: int = Field(default=128, ge=1, le=4096)
    # How long queued work may wait for requests that are still being tokenized, counted
    # from the oldest queued request. 0: never wait. Work that fills a pass never waits.
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # Pairs admitted but not yet in a forward pass; past it requests get 503 `overloaded`.
    max_queue_pairs: int = Field(default=2048, ge=1)
    # Load weights only from local files / the HF cache; never reach the hub.
    local_files_only: bool = True
