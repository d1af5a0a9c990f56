"""Per-key limits in Redis, shared by two gateway processes, and what happens when Redis
restarts under a stream of requests.

Everything here runs on a redis-server of its own (it is stopped and started again) and
an llm-svc of its own that writes slowly, so that streams stay open while the test looks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from ragline_cli.processes import ManagedProcess, free_port, redis_server
from ragline_cli.stack import Stack

from service_helpers import (
    Service,
    assert_error,
    bearer,
    gateway_env,
    poll,
    running_service,
    write_keys,
)

QUESTION = "How do honeybees tell each other where flowers are?"
ENTRIES = [
    {"id": "per-minute", "tenant": "limits", "scopes": ["chat"], "collections": ["default"],
     "requests_per_minute": 4, "max_streams": 0},
    {"id": "two-streams", "tenant": "limits", "scopes": ["chat"], "collections": ["default"],
     "requests_per_minute": 0, "max_streams": 2},
    # Limits it never reaches, but limits: its requests go through Redis.
    {"id": "steady", "tenant": "limits", "scopes": ["chat"], "collections": ["default"],
     "requests_per_minute": 100000, "max_streams": 100},
    # An ingesting client: polls its jobs while its questions need the same key's rate.
    {"id": "ingester", "tenant": "limits", "scopes": ["admin", "chat"],
     "collections": ["default"], "requests_per_minute": 3, "max_streams": 0},
]  # fmt: skip


class Setup:
    def __init__(self, redis: ManagedProcess, redis_port: int, keys: dict[str, str]) -> None:
        self.redis = redis
        self.redis_port = redis_port
        self.keys = keys
        self.gateways: dict[str, Service] = {}


@pytest.fixture(scope="module")
def setup(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("limits")
    keys = write_keys(tmp / "keys.json", ENTRIES)
    redis_port = free_port()
    with ExitStack() as stop:
        redis = redis_server(redis_port, tmp / "redis").start()
        stop.callback(redis.stop)
        redis.wait_ready(30)
        llm = stop.enter_context(
            running_service(
                "llm-slow", "ragline_llm", {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "150"}, tmp / "logs"
            )
        )
        s = Setup(redis, redis_port, keys)
        for name, on_error in (("a", "closed"), ("b", "closed"), ("open", "open")):
            env = gateway_env(
                stack.config,
                api_keys_file=str(tmp / "keys.json"),
                redis_url=f"redis://127.0.0.1:{redis_port}/0",
                llm_url=llm.url,
                rate_limit_on_redis_error=on_error,
                cache_ttl_s="0",
                redis_timeout_s="0.3",
            )
            s.gateways[name] = stop.enter_context(
                running_service(f"gateway-limits-{name}", "ragline_gateway", env, tmp / "logs")
            )
        yield s


def ask(url: str, key: str, max_tokens: int = 1) -> httpx.Response:
    """One short non-streamed answer."""
    body = {"model": "ragline", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=60)


def test_requests_per_minute_hold_across_two_gateways(setup: Setup) -> None:
    a, b = setup.gateways["a"].url, setup.gateways["b"].url
    key = setup.keys["per-minute"]
    statuses = [ask(url, key).status_code for url in (a, b, a, b)]
    assert statuses == [200, 200, 200, 200]
    for url in (a, b):  # the fifth in the minute, whichever replica takes it
        r = ask(url, key)
        assert_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
    # Another key is not affected.
    assert ask(a, setup.keys["steady"]).status_code == 200


def test_polling_jobs_costs_a_key_none_of_its_rate(setup: Setup) -> None:
    """Reads count only against the key's calls per minute (3 x CALL_RATE_MULTIPLIER 10
    here, all calls included); test_security floods them."""
    url, key = setup.gateways["a"].url, setup.keys["ingester"]
    with httpx.Client(base_url=url, headers=bearer(key), timeout=30) as client:
        # Far more reads than the key's 3 a minute: a job's progress, the lists.
        for _ in range(5):
            assert client.get("/api/jobs").status_code == 200
            assert client.get("/api/collections").status_code == 200
            assert_error(client.get(f"/api/jobs/{'0' * 32}"), 404, "job_not_found")
    # Its questions still have their whole rate ...
    assert [ask(url, key).status_code for _ in range(3)] == [200, 200, 200]
    assert_error(ask(url, key), 429, "rate_limited")
    # ... and writes are still charged like questions.
    with httpx.Client(base_url=url, headers=bearer(key), timeout=30) as client:
        body = {"documents": [{"id": "limits-doc", "text": "A document."}]}
        assert_error(
            client.post("/api/collections/default/documents", json=body), 429, "rate_limited"
        )


def test_lease_renewals_log_under_no_request_id(tmp_path: Path) -> None:
    """The renewer serves every stream of the replica; it was logging its Redis errors under
    the id of whichever request first held a lease, long finished."""
    import asyncio
    import logging

    import redis.asyncio as aioredis

    from ragline_common.logs import request_id_var
    from ragline_gateway.auth import Caller
    from ragline_gateway.limits import RedisLimiter

    port = free_port()
    server = redis_server(port, tmp_path / "redis").start()
    # (message, the request id the JSON formatter would write: read where the log call ran)
    records: list[tuple[str, str]] = []
    logged = asyncio.Event()

    def emit(record: logging.LogRecord) -> None:
        records.append((record.getMessage(), request_id_var.get()))
        logged.set()

    handler = logging.Handler()
    handler.emit = emit  # type: ignore[method-assign]
    logging.getLogger("ragline.limits").addHandler(handler)

    async def scenario() -> None:
        client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        limiter = RedisLimiter(client, on_redis_error="closed", lease_ttl_s=5)
        caller = Caller("renewing", "t", frozenset({"chat"}), ("*",), 0, 4)
        token = request_id_var.set("first-request")
        await limiter.acquire(caller, stream=True)
        request_id_var.reset(token)
        server.stop()  # the next renewal (every ttl/3) fails and is logged
        try:
            await asyncio.wait_for(logged.wait(), 15)
        except TimeoutError:
            pass  # asserted below
        await limiter.aclose()
        await client.aclose()

    try:
        server.wait_ready(30)
        asyncio.run(scenario())
    finally:
        server.stop()
        logging.getLogger("ragline.limits").removeHandler(handler)
    renewals = [rid for msg, rid in records if "renew" in msg]
    assert renewals, "no renewal failure was logged"
    assert set(renewals) == {"-"}


def test_concurrent_streams_hold_across_two_gateways(setup: Setup) -> None:
    a, b = setup.gateways["a"].url, setup.gateways["b"].url
    key = setup.keys["two-streams"]
    body = {"message": QUESTION}
    held: list[Iterator[bytes]] = []
    with ExitStack() as streams:
        for url in (a, b):
            r = streams.enter_context(
                httpx.stream("POST", f"{url}/api/chat", json=body, headers=bearer(key), timeout=60)
            )
            assert r.status_code == 200
            held.append(first_token(r))  # mid-answer, and the stream stays open
        for url in (a, b):
            third = httpx.post(f"{url}/api/chat", json=body, headers=bearer(key), timeout=60)
            assert_error(third, 429, "rate_limited")
            assert third.headers["retry-after"] == "1"
    # Both streams closed (the client left): their slots are free again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = ask(b, key)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def first_token(response: httpx.Response) -> Iterator[bytes]:
    """Reads up to the first token and returns the open byte iterator: keep it referenced
    to keep the stream open (closing the iterator would close the connection)."""
    chunks = response.iter_raw()
    seen = b""
    while b"event: token" not in seen:
        seen += next(chunks)
    return chunks


def test_redis_restart_under_load(setup: Setup) -> None:
    """Fail closed answers 503 while Redis is down, fail open keeps answering; both recover
    once Redis is back, without a gateway restart, and no request ever gets a 500."""
    seen: dict[str, list[int]] = {"a": [], "open": []}
    stop = threading.Event()

    def load(name: str) -> None:
        url = setup.gateways[name].url
        while not stop.is_set():
            try:
                seen[name].append(ask(url, setup.keys["steady"]).status_code)
            except httpx.HTTPError as exc:  # the gateway must never drop a connection
                seen[name].append(-1)
                print(f"{name}: {exc!r}")

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in seen]
    for t in threads:
        t.start()
    try:
        poll(lambda: all(200 in v for v in seen.values()), 30, "answers before the outage")
        setup.redis.stop()
        mark = {n: len(v) for n, v in seen.items()}
        poll(lambda: 503 in seen["a"][mark["a"] :], 30, "fail closed: 503 while Redis is down")
        during_open = len(seen["open"])
        poll(lambda: len(seen["open"]) > during_open + 2, 30, "fail open keeps answering")
        assert set(seen["open"][during_open:]) == {200}

        setup.redis.start()
        setup.redis.wait_ready(30)
        back = {n: len(v) for n, v in seen.items()}
        poll(lambda: seen["a"][back["a"] :][-3:] == [200, 200, 200], 30, "fail closed recovers")
        poll(lambda: seen["open"][back["open"] :][-3:] == [200] * 3, 30, "fail open still fine")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for name, statuses in seen.items():
        assert set(statuses) <= {200, 503}, (name, sorted(set(statuses)))
        assert setup.gateways[name].proc.alive()
    refused = [r for r in (ask(setup.gateways["a"].url, setup.keys["steady"]),)]
    assert refused[0].status_code == 200


def test_fail_closed_error_is_clear(setup: Setup, tmp_path: Path) -> None:
    """While Redis is down a fail-closed gateway says why, with Retry-After."""
    setup.redis.stop()
    try:
        r = ask(setup.gateways["b"].url, setup.keys["steady"])
        assert_error(r, 503, "rate_limiter_unavailable")
        assert r.headers["retry-after"]
    finally:
        setup.redis.start()
        setup.redis.wait_ready(30)
