"""Settings base: every service reads environment variables with its own prefix.

A missing or malformed setting fails at start-up (pydantic validation), never at request
time.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # Graceful shutdown (see `ragline_common.service.serve`). After SIGTERM the service
    # keeps listening for `shutdown_drain_s` with /readyz answering 503, so the load
    # balancer stops routing here before the listener closes; then open requests and
    # streams get up to `shutdown_grace_s` to finish before they are cancelled.
    shutdown_drain_s: float = Field(default=5.0, ge=0)
    shutdown_grace_s: float = Field(default=30.0, gt=0)
