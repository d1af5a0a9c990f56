"""Helpers the service tests share: one service on a free loopback port, its metrics, and
the error envelope every service answers with."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ragline_cli.processes import ManagedProcess, free_port, http_ready, python_service

JSON_HEADERS = {"content-type": "application/json"}
T = TypeVar("T")


@dataclass
class Service:
    proc: ManagedProcess
    url: str
    port: int


@contextmanager
def running_service(
    name: str,
    module: str,
    env: dict[str, str],
    log_dir: Path,
    ready_timeout: float = 120,
    ready_path: str = "/readyz",
    python: Path | None = None,
) -> Iterator[Service]:
    """`python -m MODULE` on a free port (its `RAGLINE_<SVC>_PORT` set here, offline from
    the Hugging Face hub), waited on until `ready_path` answers 200, stopped on leaving.
    `python` is the interpreter (default: this one), e.g. llm-svc's own vLLM venv."""
    port = free_port()
    port_var = f"RAGLINE_{module.removeprefix('ragline_').upper()}_PORT"
    drain_var = port_var.removesuffix("_PORT") + "_SHUTDOWN_DRAIN_S"
    # No load balancer in front: stop without the production drain unless a test sets one.
    full_env = {port_var: str(port), drain_var: "0", "HF_HUB_OFFLINE": "1", **env}
    proc = python_service(name, module, port, full_env, log_dir)
    if python is not None:
        proc.argv[0] = str(python)
    url = f"http://127.0.0.1:{port}"
    proc.ready = http_ready(f"{url}{ready_path}")
    proc.start()
    try:
        proc.wait_ready(ready_timeout)
        yield Service(proc, url, port)
    finally:
        proc.stop()


def metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (with these labels) on `base_url`/metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """`response` is the error envelope `{"error": {"code", "message", "request_id"}}`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def raw_get(base_url: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET `path` exactly as written (`..`, `%2F` and all), which httpx would normalise; the
    answer as an httpx.Response."""
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        conn.close()


def post_malformed(url: str, content: bytes) -> httpx.Response:
    """POST `content` (cut-off JSON) to `url`, labelled as JSON."""
    return httpx.post(url, content=content, headers=JSON_HEADERS, timeout=10)


def post_until_ok(url: str, body: Any, within: float) -> httpx.Response:
    """POST `body` to `url` until it answers 200 or `within` seconds pass; the last answer."""
    deadline = time.monotonic() + within
    while True:
        response = httpx.post(url, json=body, timeout=30)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response


def lower_session_priority(pid: int, nice: int = 5) -> None:
    """Give the vLLM service's session a lower CPU weight than the test's own.

    vLLM's CPU build busy-waits between its processes (`sched_yield` spins). The service
    runs in a session of its own, and Linux schedules each session as one group
    (autogroup): measured here on 2 cores, the test process then got no CPU for 1-5 s at
    a time while the engine generated, so it could neither read a stream nor drop it on
    time. At autogroup nice 5 those stalls are gone (and the engine still has the cores
    whenever the test waits). Where autogroups are off the file is absent: nothing to do.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


def write_keys(path: Path, entries: list[dict[str, Any]]) -> dict[str, str]:
    """A gateway keys file for `entries` (KeyEntry fields without `sha256`); returns
    {key id: the key itself}, which only the test knows."""
    from ragline_gateway.auth import hash_key, new_key

    keys = {entry["id"]: new_key() for entry in entries}
    body = {"keys": [{**e, "sha256": hash_key(keys[e["id"]])} for e in entries]}
    path.write_bytes(orjson.dumps(body))
    return keys


def gateway_env(stack_config: Any, **settings: str) -> dict[str, str]:
    """Env of a gateway of a test's own on the session stack's backends and Redis;
    `settings` are RAGLINE_GATEWAY_* settings by lower-case name."""
    c = stack_config
    env = {
        "RAGLINE_GATEWAY_RETRIEVER_URL": f"http://127.0.0.1:{c.retriever_port}",
        "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{c.reranker_port}",
        "RAGLINE_GATEWAY_LLM_URL": f"http://127.0.0.1:{c.llm_port}",
        "RAGLINE_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{c.redis_port}/0",
    }
    env.update({f"RAGLINE_GATEWAY_{k.upper()}": v for k, v in settings.items()})
    return env


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_events(url: str, body: dict[str, Any], key: str | None = None) -> list[Any]:
    """One `/api/chat` answer, read to its end: the sse_client events."""
    from sse_client import read_events

    headers = bearer(key) if key else {}
    with httpx.stream("POST", f"{url}/api/chat", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return read_events(r)


def event(events: list[Any], name: str) -> Any:
    """The data of the first event called `name`."""
    return next(e.data for e in events if e.name == name)


def poll(check: Callable[[], T | None], within: float, what: str, interval: float = 0.05) -> T:
    """`check()` until it returns something truthy, which is returned; fails after `within`
    seconds saying `what` did not happen. The tests' one way to wait (never a fixed sleep)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f}s")
        time.sleep(interval)
