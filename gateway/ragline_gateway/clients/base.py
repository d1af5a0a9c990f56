"""What the three upstream clients share: one pooled client, explicit timeouts, request id
forwarding, one exception type the pipeline turns into degradation or an error, and a
background health watch so that an upstream known to be dead fails requests at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from ragline_common.middleware import request_headers
from ragline_common.service_token import HEADER as SERVICE_TOKEN_HEADER
from ragline_common.service_token import REFUSED_CODE as TOKEN_REFUSED
from ragline_gateway.clients.network import upstream_transport
from ragline_gateway.metrics import UPSTREAM_UP

log = logging.getLogger("ragline.upstreams")


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


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

    def __init__(
        self,
        base_url: str,
        pool_size: int,
        connect_timeout: float = 2.0,
        upstream_http: str = "httptools",
    ) -> None:
        # Idle connections are dropped after 4 s, before the upstream's uvicorn closes them
        # (its keep-alive timeout is 5 s): a request sent on a connection the server is
        # closing at that moment would fail with "server disconnected".
        limits = httpx.Limits(
            max_connections=pool_size, max_keepalive_connections=pool_size, keepalive_expiry=4.0
        )
        self.http = httpx.AsyncClient(
            base_url=base_url,
            # `upstream_http`: which HTTP/1.1 client speaks to a plain-HTTP upstream
            # (settings.upstream_http; clients/network.py).
            transport=upstream_transport(base_url, limits, upstream_http),
            timeout=httpx.Timeout(30.0, connect=connect_timeout),
            event_hooks={"response": [self._refused_token]},
        )
        # Set by `watch`: the last health probes all went unanswered.
        self.known_down = False

    def send_service_token(self, token: str) -> None:
        """Every request to this upstream carries `token` in `X-Ragline-Service-Token`
        (the gateway's SERVICE_TOKEN; ragline_common.service_token), as a default header
        of the one client, so no call path can forget it. Empty: none is sent."""
        if token:
            self.http.headers[SERVICE_TOKEN_HEADER] = token
        else:
            self.http.headers.pop(SERVICE_TOKEN_HEADER, None)

    async def _refused_token(self, response: httpx.Response) -> None:
        """A response hook of the client: a 401 `invalid_service_token` means the gateway's
        SERVICE_TOKEN and the upstream's differ, an operator's mistake, not the caller's.
        Raised as an UpstreamError without a status, so every call path (the LLM stream
        included) treats it as the upstream being unavailable (503 or degradation), never
        as the user's own 401; logged, without the token, so the cause is named."""
        if response.status_code != 401:
            return
        await response.aread()
        body = json_or_none(response)
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, dict) and error.get("code") == TOKEN_REFUSED):
            return
        sent = SERVICE_TOKEN_HEADER in self.http.headers
        log.error(
            "upstream refused the gateway's service token: set the same SERVICE_TOKEN on "
            "the gateway and on it",
            extra={"upstream": self.name, "token_sent": sent},
        )
        raise UpstreamError(self.name, "refused the gateway's service token (SERVICE_TOKEN)")

    async def aclose(self) -> None:
        await self.http.aclose()

    async def watch(self, interval: float, timeout: float, misses_to_down: int) -> None:
        """Probes `health_path` every `interval` for as long as the process runs.

        A frozen upstream (SIGSTOP, a wedged event loop, a black-holed node) still accepts
        TCP connections, so every request would wait out its full stage timeout (60 s for
        the first token) to learn what a 2 s probe already knows. After `misses_to_down`
        probes in a row get no answer the upstream is `known_down` and requests fail at
        once (503, or the stage's degradation); the first answered probe brings it back.
        Any HTTP answer counts as alive: a 503 from a draining upstream is its own reply.
        """
        misses = 0
        UPSTREAM_UP.labels(self.name).set(1)
        while True:
            try:
                response = await self.http.get(self.health_path, timeout=timeout)
                misses = 0
                self.observe_health(response.status_code, json_or_none(response))
            except httpx.HTTPError:
                misses += 1
            down = misses >= misses_to_down
            if down != self.known_down:
                self.known_down = down
                self.health_changed(down, misses)
            await asyncio.sleep(interval)

    def health_changed(self, down: bool, misses: int) -> None:
        """`watch` found the upstream down, or answering again: the gauge and a log line.
        (The retriever's replicas override it: clients/retriever.py.)"""
        UPSTREAM_UP.labels(self.name).set(0 if down else 1)
        if down:
            log.warning("upstream down: failing its requests fast until it answers",
                        extra={"upstream": self.name, "probes_missed": misses})  # fmt: skip
        else:
            log.warning("upstream answering again", extra={"upstream": self.name})

    def observe_health(self, status: int, payload: Any) -> None:
        """A health probe's answer (status, JSON body or None), for clients that learn
        something from it (the reranker: what it scores with)."""

    def check_reachable(self) -> None:
        if self.known_down:
            raise UpstreamError(self.name, "unreachable (its health probes go unanswered)")

    async def call(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None
    ) -> Any:
        """One JSON request; any failure becomes an UpstreamError naming this upstream."""
        self.check_reachable()
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
