"""What the three upstream clients share: one pooled client, explicit timeouts, request id
forwarding, and one exception type the pipeline turns into degradation or an error."""

from __future__ import annotations

from typing import Any

import httpx

from ragline_common.middleware import request_headers
from ragline_gateway.clients.network import upstream_transport


class UpstreamError(Exception):
    """An upstream call failed: unreachable, timed out, or answered with an error status."""

    def __init__(self, upstream: str, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(f"{upstream}: {message}")
        self.upstream = upstream
        self.status = status
        self.body = body or {}

    @property
    def error_code(self) -> str | None:
        err = self.body.get("error")
        return err.get("code") if isinstance(err, dict) else None

    @property
    def error_message(self) -> str:
        err = self.body.get("error")
        return str(err.get("message")) if isinstance(err, dict) else str(self)


class UpstreamClient:
    name = "upstream"
    # What the gateway's /readyz probes.
    health_path = "/readyz"

    def __init__(self, base_url: str, pool_size: int, connect_timeout: float = 2.0) -> None:
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        self.http = httpx.AsyncClient(
            base_url=base_url,
            transport=upstream_transport(base_url, limits),
            timeout=httpx.Timeout(30.0, connect=connect_timeout),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None
    ) -> Any:
        """One JSON request; any failure becomes an UpstreamError naming this upstream."""
        try:
            response = await self.http.request(
                method, path, json=body, headers=request_headers(), timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise UpstreamError(self.name, f"timed out after {timeout}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(self.name, f"unreachable ({type(exc).__name__})") from exc
        return self._checked(response)

    def _checked(self, response: httpx.Response) -> Any:
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            raise UpstreamError(
                self.name, f"answered {response.status_code}", response.status_code,
                payload if isinstance(payload, dict) else {},
            )  # fmt: skip
        return payload
