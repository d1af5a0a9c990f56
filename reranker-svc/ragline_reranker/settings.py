"""reranker-svc settings: environment variables prefixed `RAGLINE_RERANKER_`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragline_common.settings import ServiceSettings


class RerankerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_RERANKER_", extra="ignore")

    port: int = 8002
    # A cross-encoder checkpoint (hub id or local path). Empty: no cross-encoder weights,
    # score with the packaged bi-encoder (all-MiniLM-L6-v2) and say so in logs and /readyz.
    model: str = ""
    # auto: cross-encoder when `model` is set, else bi-encoder.
    scorer: Literal["auto", "cross-encoder", "bi-encoder"] = "auto"
    # Bi-encoder weights; empty means the packaged all-MiniLM-L6-v2.
    bi_encoder_model: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = True  # applies on CUDA only
    max_length: int = Field(default=512, ge=8, le=8192)
    max_batch_pairs: int = Field(default=64, ge=1, le=4096)
    max_queue_pairs: int = Field(default=2048, ge=1)
    # Load weights only from local files / the HF cache; never reach the hub.
    local_files_only: bool = True
