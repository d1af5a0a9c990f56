"""Settings base: every service reads environment variables with its own prefix.

A missing or malformed setting fails at start-up (pydantic validation), never at request
time.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
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
    # /metrics on a port of its own (same host, same event loop), and no longer on `port`
    # (404 there), so that a network policy can open metrics to Prometheus without opening
    # the API. 0: /metrics on `port`, as on a local stack.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # The shared secret of the internal hops (ragline_common.service_token). On retriever,
    # reranker and llm-svc: when set, every request but /healthz and /readyz must carry it
    # in `X-Ragline-Service-Token` (401 otherwise). On the gateway: sent with every call to
    # those three. Several tokens separated by commas, for a rotation without refusals:
    # a service accepts any of them, the gateway sends the first. Empty: not required.
    service_token: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _metrics_port_is_another_port(self) -> ServiceSettings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port {self.metrics_port} is the service's own port: "
                "give metrics another port, or 0 to serve /metrics on the service port"
            )
        return self
