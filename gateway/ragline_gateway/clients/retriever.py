"""retriever-svc client: hybrid retrieval and the document management the gateway forwards,
to one retriever or to several replicas of it.

`RAGLINE_GATEWAY_RETRIEVER_URL` is one base URL or a comma-separated list of them. In
Kubernetes it is one Service URL, and kube-proxy spreads the connections over the ready
pods. With a list, calls take the replicas in turn (round robin), each replica with its
own connection pool (`upstream_pool_size` each) and its own health watch: a replica whose
probes go unanswered is left out of the turn, one whose probes answer 503 (starting,
draining) is taken only when no replica is ready, and the retriever as a whole is known
down (`ragline_upstream_up{upstream="retriever"}` 0: its requests fail at once) only when
every replica is.

Why a retry: when a replica dies under load (SIGKILL, OOM, a node drained), the requests
in flight on it, and the new ones sent to it before the health watch notices (a few
seconds: `UPSTREAM_DOWN_AFTER` probes), would get a 503 although another replica could
answer. Retrieval is read-only, so the read-only calls (`retrieve`, `index_version`, a GET
through `call`) are retried once, on the next replica in turn, when the first attempt
says "this replica is gone or not serving": no connection could be made, or it broke
before the answer (refused, reset, closed: httpx's ConnectError, ReadError, WriteError,
RemoteProtocolError), or the replica answered 503 (starting, draining, its stores
failing). Each retry is counted (`ragline_upstream_retries_total`) and logged (a warning
naming the replica and the error). With one URL the retry goes to the same Service:
after a broken connection over another one, pooled or new, so kube-proxy may pick another
pod; after a 503 maybe over the same kept-alive connection, so the same pod.

Its limits, deliberately:
- Nothing else is retried: a 4xx would fail on any replica, another 5xx is a bug, and a
  timeout has already spent the stage's budget (a replica that answers nothing, e.g. a
  dead node that sends no reset, shows as a timeout: the health watch takes it out).
- One deadline for both attempts: the retry gets what is left of the caller's timeout, so
  a retry does not make the stage slower than its timeout.
- Document management passed through (`forward`: ingest, delete, jobs, files, verify)
  takes the next replica in turn and is never retried: a job POST is not idempotent.
- With one Service URL, until the dead pod leaves the Service's endpoints (its readiness
  probe: period 5 s, 2 failures) kube-proxy may route the retry to that pod too, and the
  request fails as before (503, `retrieval_unavailable`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from ragline_common.middleware import request_headers
from ragline_common.wire import Filters, RetrieveResponse
from ragline_gateway.clients.base import UpstreamClient, UpstreamError
from ragline_gateway.metrics import UPSTREAM_RETRIES, UPSTREAM_UP

log = logging.getLogger("ragline.upstreams")

# The failures that say "this replica is gone": no connection, or one that broke before
# the answer. Not httpx.TimeoutException (module docstring).
GONE = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
DOWN = "unreachable (its health probes go unanswered)"


def replica_urls(setting: str) -> list[str]:
    """The base URLs of `RAGLINE_GATEWAY_RETRIEVER_URL`: one, or a comma-separated list."""
    urls = [u.strip().rstrip("/") for u in setting.split(",") if u.strip()]
    for url in urls:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"retriever URL {url!r} is not an http(s) base URL")
    if not urls:
        raise ValueError("no retriever URL given (RAGLINE_GATEWAY_RETRIEVER_URL)")
    return urls


def retryable(error: UpstreamError) -> bool:
    """Whether a failed attempt may be tried again on another replica (module docstring)."""
    return error.status == 503 or isinstance(error.__cause__, GONE)


class Replica(UpstreamClient):
    """One retriever-svc replica: its own pool, health watch and `known_down`."""

    name = "retriever"

    def __init__(
        self,
        url: str,
        pool_size: int,
        connect_timeout: float,
        on_change: Callable[[], None],
        upstream_http: str = "httptools",
    ) -> None:
        super().__init__(url, pool_size, connect_timeout, upstream_http)
        self.url = url
        self._on_change = on_change
        # False while its health probes answer 503 (starting, draining): taken only when
        # no replica is serving.
        self.serving = True

    def observe_health(self, status: int, payload: Any) -> None:
        self.serving = status == 200

    def health_changed(self, down: bool, misses: int) -> None:
        message = "left out of the rotation until it answers" if down else "answering again"
        extra = {"upstream": self.name, "replica": self.url, "probes_missed": misses}
        log.warning(f"retriever replica {message}", extra=extra)
        self._on_change()


class RetrieverClient:
    """The upstream client of the retriever (the interface of `UpstreamClient`: `call`,
    `watch`, `known_down`, `check_reachable`, ...) over one replica or several."""

    name = "retriever"
    health_path = "/readyz"

    def __init__(
        self,
        base_url: str,
        pool_size: int,
        connect_timeout: float = 2.0,
        upstream_http: str = "httptools",
    ) -> None:
        self.replicas = [
            Replica(url, pool_size, connect_timeout, self._health_changed, upstream_http)
            for url in replica_urls(base_url)
        ]
        self._turn = itertools.count()

    @property
    def known_down(self) -> bool:
        return all(r.known_down for r in self.replicas)

    def _health_changed(self) -> None:
        UPSTREAM_UP.labels(self.name).set(0 if self.known_down else 1)
        if self.known_down:
            log.warning("upstream down: failing its requests fast until it answers",
                        extra={"upstream": self.name})  # fmt: skip

    def send_service_token(self, token: str) -> None:
        for replica in self.replicas:
            replica.send_service_token(token)

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.aclose()

    async def watch(self, interval: float, timeout: float, misses_to_down: int) -> None:
        """Each replica's health watch (UpstreamClient.watch), side by side."""
        await asyncio.gather(*(r.watch(interval, timeout, misses_to_down) for r in self.replicas))

    def observe_health(self, status: int, payload: Any) -> None:
        """Nothing to learn from the retriever's health answers (UpstreamClient's hook)."""

    def check_reachable(self) -> None:
        if self.known_down:
            raise UpstreamError(self.name, DOWN)

    def _next(self, instead_of: Replica | None = None) -> Replica:
        """The next replica in turn among those not known down (serving ones first); for
        a retry, one other than `instead_of` when there is one (with one URL: the same)."""
        live = [r for r in self.replicas if not r.known_down]
        if not live:
            raise UpstreamError(self.name, DOWN)
        live = [r for r in live if r.serving] or live
        others = [r for r in live if r is not instead_of] or live
        return others[next(self._turn) % len(others)]

    async def _send(
        self, replica: Replica, method: str, path: str, timeout: float, **kwargs: Any
    ) -> httpx.Response:
        """One request to `replica`; no answer at all is an UpstreamError whose cause is
        httpx's exception."""
        kwargs.setdefault("headers", request_headers())
        try:
            return await replica.http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise UpstreamError(self.name, f"timed out after {timeout:.3g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(self.name, f"unreachable ({type(exc).__name__})") from exc

    async def _json(
        self, replica: Replica, method: str, path: str, timeout: float, body: Any
    ) -> Any:
        return replica._checked(await self._send(replica, method, path, timeout, json=body))

    async def _idempotent(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None
    ) -> Any:
        """A read-only JSON call: retried once on the next replica when the first attempt
        finds its replica gone or not serving, within the caller's `timeout` for both."""
        deadline = time.monotonic() + timeout
        replica = self._next()
        try:
            return await self._json(replica, method, path, timeout, body)
        except UpstreamError as exc:
            left = deadline - time.monotonic()
            if not retryable(exc) or left <= 0 or self.known_down:
                raise
            retry_on = self._next(instead_of=replica)
            UPSTREAM_RETRIES.labels(self.name).inc()
            cause = repr(exc.__cause__) if exc.__cause__ else f"{exc.status} {exc.error_code}"
            log.warning(
                "retriever call failed on a replica: retried once on the next",
                extra={"upstream": self.name, "replica": replica.url, "error": cause,
                       "path": path, "retry_on": retry_on.url, "time_left_s": round(left, 3)},
            )  # fmt: skip
            return await self._json(retry_on, method, path, left, body)

    async def call(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None
    ) -> Any:
        """One JSON request (UpstreamClient.call): a GET is read-only, so retried as
        `_idempotent` says; anything else goes to one replica."""
        if method == "GET":
            return await self._idempotent(method, path, timeout, body)
        return await self._json(self._next(), method, path, timeout, body)

    async def retrieve(
        self, query: str, collection: str, top_k: int, filters: Filters, timeout: float
    ) -> RetrieveResponse:
        body = {"query": query, "collection": collection, "top_k": top_k, "filters": filters}
        return RetrieveResponse.model_validate(
            await self._idempotent("POST", "/v1/retrieve", timeout, body)
        )

    async def index_version(self, collection: str, timeout: float) -> str:
        """Changes whenever a write to the collection becomes searchable (the cache key)."""
        payload = await self.call("GET", f"/v1/collections/{collection}/version", timeout)
        return str(payload["version"])

    async def forward(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        content: bytes,
        content_type: str | None,
        timeout: float,
    ) -> httpx.Response:
        """One document-management request passed through as it came: the retriever owns
        those bodies and their errors, so the gateway neither re-validates nor rewraps them.
        The next replica in turn; never retried (a job POST is not idempotent)."""
        headers = request_headers()
        if content_type:
            headers["content-type"] = content_type
        return await self._send(
            self._next(), method, path, timeout, params=params, content=content, headers=headers
        )
