"""The shared service token of the internal hops: gateway → retriever, reranker, llm-svc.

The gateway authenticates users (API keys); the services behind it trust the gateway. On
the network that trust needs a proof, or any pod that reaches a service port can read
every collection or delete documents. With `SERVICE_TOKEN` set, retriever-svc,
reranker-svc and llm-svc answer only requests that carry it in `X-Ragline-Service-Token`
(`ServiceTokenMiddleware`); the gateway puts it on every upstream call
(ragline_gateway/clients/base.py). `/healthz` and `/readyz` stay open for the kubelet's
probes; metrics on a port of their own (`METRICS_PORT`) are not behind it either.

The setting may hold several tokens separated by commas: a service accepts any of them,
the gateway sends the first. Rotating without a refused request (docs/deploying.md):
`OLD,NEW` everywhere, then `NEW,OLD`, then `NEW`, with a rolling restart after each step.

The token is never logged and never echoed; it is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from ragline_common.errors import error_response

HEADER = "X-Ragline-Service-Token"
_HEADER_KEY = HEADER.lower().encode("latin-1")
# What a caller may reach without the token: the kubelet's probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The error code of a refusal (the gateway recognises it: a misconfiguration, not a user's).
REFUSED_CODE = "invalid_service_token"

log = logging.getLogger("ragline.auth")


def service_tokens(setting: SecretStr | str) -> tuple[str, ...]:
    """The tokens a setting holds (comma-separated; blanks around them and empty entries
    ignored). Empty: no token required."""
    value = setting.get_secret_value() if isinstance(setting, SecretStr) else setting
    return tuple(part.strip() for part in value.split(",") if part.strip())


def token_to_send(setting: SecretStr | str) -> str:
    """What the gateway sends: the first token, or "" (send none)."""
    tokens = service_tokens(setting)
    return tokens[0] if tokens else ""


def _digest(value: bytes) -> bytes:
    # Compared as digests: equal lengths, so the comparison time says nothing about the
    # token's length either.
    return hashlib.sha256(value).digest()


class ServiceTokenMiddleware:
    """Pure ASGI: refuses (401, the JSON error envelope) every HTTP request but the open
    paths unless it carries one of `tokens` in `X-Ragline-Service-Token`."""

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...]) -> None:
        if not tokens:
            raise ValueError("ServiceTokenMiddleware needs at least one token")
        self.app = app
        self.digests = tuple(_digest(t.encode("utf-8")) for t in tokens)

    def accepts(self, given: bytes) -> bool:
        digest = _digest(given)
        ok = False
        for expected in self.digests:  # every one compared: no early exit to time
            ok |= hmac.compare_digest(digest, expected)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given: bytes | None = None
        for name, value in scope["headers"]:
            if name == _HEADER_KEY:
                given = value
                break
        if given is not None and self.accepts(given):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        log.warning(
            "request refused: no valid service token",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "client": client[0] if client else "",
                "token_sent": given is not None,  # whether, never what
            },
        )
        message = f"this service answers only the ragline gateway: header {HEADER} " + (
            "does not match" if given is not None else "missing"
        )
        await error_response(401, REFUSED_CODE, message)(scope, receive, send)
