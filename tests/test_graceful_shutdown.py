"""SIGTERM: readiness turns 503, new streams are refused, open streams finish, exit 0.

Each test starts the processes it signals (a gateway and a slow llm-svc next to the shared
stack's retriever and reranker, or one backend service), so the shared stack stays up.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import orjson
import pytest

from ragline_cli.stack import Stack

from service_helpers import Service, assert_error, poll, running_service
from sse_client import Event

QUESTION = "How do honeybees tell each other where flowers are?"
READY_TIMEOUT = 180


def slow_llm(log_dir: Path, token_interval_ms: int) -> AbstractContextManager[Service]:
    env = {
        "RAGLINE_LLM_TOKEN_INTERVAL_MS": str(token_interval_ms),
        "RAGLINE_LLM_SHUTDOWN_DRAIN_S": "0",  # only the gateway's shutdown is under test
    }
    return running_service("llm-slow", "ragline_llm", env, log_dir, READY_TIMEOUT)


def gateway(
    stack: Stack, llm: Service, log_dir: Path, drain_s: float, grace_s: float
) -> AbstractContextManager[Service]:
    c = stack.config
    env = {
        "RAGLINE_GATEWAY_RETRIEVER_URL": f"http://127.0.0.1:{c.retriever_port}",
        "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{c.reranker_port}",
        "RAGLINE_GATEWAY_LLM_URL": llm.url,
        "RAGLINE_GATEWAY_ALLOW_ANONYMOUS": "true",
        "RAGLINE_GATEWAY_SHUTDOWN_DRAIN_S": str(drain_s),
        "RAGLINE_GATEWAY_SHUTDOWN_GRACE_S": str(grace_s),
    }
    return running_service("gateway-drain", "ragline_gateway", env, log_dir, READY_TIMEOUT)


def status_is(url: str, status: int) -> Callable[[], httpx.Response | None]:
    def check() -> httpx.Response | None:
        try:
            response = httpx.get(url, timeout=5)
        except httpx.TransportError:
            return None
        return response if response.status_code == status else None

    return check


def refused(url: str) -> Callable[[], bool]:
    """True once nothing listens at `url` any more: connection refused, or a connection
    that the kernel had queued just before the listener closed and then reset."""

    def check() -> bool:
        try:
            httpx.get(url, timeout=5)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return True
        return False

    return check


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """The `event:`/`data:` frames of `response` one by one, as they arrive."""
    buffer = b""
    for read_no, chunk in enumerate(response.iter_raw()):
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            name, data = "message", None
            for line in frame.decode().splitlines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
            if data is not None:  # else a `: ping` comment
                yield Event(name, orjson.loads(data), time.perf_counter(), read_no)


def follow(url: str, first_token: threading.Event) -> tuple[list[Event], Exception | None]:
    """Ask over SSE and read the answer to its end: the events and, where the stream was
    cut, the transport error. `first_token` is set when the first token arrives."""
    events: list[Event] = []
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as client:
        with client.stream("POST", "/api/chat", json={"message": QUESTION}) as response:
            assert response.status_code == 200, response.read()
            try:
                for event in sse_events(response):
                    events.append(event)
                    if event.name == "token":
                        first_token.set()
            except httpx.TransportError as exc:
                return events, exc
    return events, None


def open_streams(
    pool: ThreadPoolExecutor, url: str, count: int
) -> list[Future[tuple[list[Event], Exception | None]]]:
    """`count` answers streaming from `url`, each past its first token on return."""
    started = [threading.Event() for _ in range(count)]
    futures = [pool.submit(follow, url, flag) for flag in started]
    deadline = time.monotonic() + 60
    for flag, future in zip(started, futures, strict=True):
        while not flag.wait(0.1):
            if future.done():  # ended (or failed) before its first token
                raise AssertionError(f"stream ended before a token: {future.result()}")
            assert time.monotonic() < deadline, "no first token within 60s"
    return futures


def log_messages(svc: Service) -> list[str]:
    lines = svc.proc.log_path.read_text(errors="replace").splitlines()
    return [orjson.loads(line).get("msg", "") for line in lines if line.startswith("{")]


def test_sigterm_drains_then_lets_open_streams_finish(stack: Stack, tmp_path: Path) -> None:
    drain_s, grace_s = 3.0, 60.0
    # At 200 ms a word an answer takes several seconds: longer than the drain.
    with (
        slow_llm(tmp_path, token_interval_ms=200) as llm,
        gateway(stack, llm, tmp_path, drain_s, grace_s) as gw,
        ThreadPoolExecutor(2) as pool,
    ):
        futures = open_streams(pool, gw.url, 2)
        signalled = time.monotonic()
        gw.proc.proc.send_signal(signal.SIGTERM)

        # Draining: still listening, but not ready, and no new streams.
        ready = poll(status_is(f"{gw.url}/readyz", 503), 5, "/readyz 503 after SIGTERM")
        assert ready.json()["status"] == "not_ready"
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
        refused_stream = httpx.post(f"{gw.url}/api/chat", json={"message": QUESTION}, timeout=10)
        assert_error(refused_stream, 503, "shutting_down")
        assert int(refused_stream.headers["retry-after"]) >= 1

        # After the drain the listener closes while the two answers are still streaming.
        poll(refused(f"{gw.url}/healthz"), drain_s + 10, "listener closed after the drain")
        assert time.monotonic() - signalled >= drain_s - 0.5
        assert not all(f.done() for f in futures), "answers ended before the drain did"

        for future in futures:
            events, cut = future.result(timeout=grace_s)
            names = [e.name for e in events]
            assert cut is None, f"stream cut: {cut!r} after {names}"
            assert names[-1] == "done" and "error" not in names, names

        code = gw.proc.proc.wait(timeout=drain_s + grace_s)
        assert code == 0, gw.proc.log_tail()
        assert time.monotonic() - signalled < drain_s + grace_s
    messages = log_messages(gw)
    assert "draining: readiness 503, new streams refused" in messages
    assert "shut down" in messages


def test_grace_deadline_ends_streams_that_outlast_it(stack: Stack, tmp_path: Path) -> None:
    """A stream still open when the grace runs out ends with an SSE `error` event just
    before the deadline (a clean end a client can act on), not a cut connection."""
    drain_s, grace_s = 1.0, 2.0
    # At 3 s a word the answer would take minutes.
    with (
        slow_llm(tmp_path, token_interval_ms=3000) as llm,
        gateway(stack, llm, tmp_path, drain_s, grace_s) as gw,
        ThreadPoolExecutor(1) as pool,
    ):
        (future,) = open_streams(pool, gw.url, 1)
        signalled = time.monotonic()
        gw.proc.proc.send_signal(signal.SIGTERM)
        margin = 15  # lifespan shutdown and process exit on a busy machine
        code = gw.proc.proc.wait(timeout=drain_s + grace_s + margin)
        took = time.monotonic() - signalled
        assert code == 0, gw.proc.log_tail()
        assert drain_s + grace_s * 0.75 - 0.5 <= took < drain_s + grace_s + margin
        events, cut = future.result(timeout=30)
        assert cut is None  # the stream ended, it was not cut
        names = [e.name for e in events]
        assert "done" not in names and names[-1] == "error", names
        assert events[-1].data["code"] == "shutting_down"
    assert not any("timeout graceful shutdown exceeded" in m for m in log_messages(gw))


@pytest.mark.parametrize("module", ["ragline_llm", "ragline_reranker"])
def test_backend_readiness_drains_before_exit(module: str, tmp_path: Path) -> None:
    drain_s = 3.0
    prefix = f"RAGLINE_{module.removeprefix('ragline_').upper()}_"
    env = {f"{prefix}SHUTDOWN_DRAIN_S": str(drain_s)}
    with running_service(f"{module}-drain", module, env, tmp_path, READY_TIMEOUT) as svc:
        signalled = time.monotonic()
        svc.proc.proc.send_signal(signal.SIGTERM)
        ready = poll(status_is(f"{svc.url}/readyz", 503), 5, "/readyz 503 after SIGTERM")
        assert_error(ready, 503, "draining")
        # Still listening (and serving) while the load balancer takes it out.
        assert httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200
        code = svc.proc.proc.wait(timeout=drain_s + 30)
        assert code == 0, svc.proc.log_tail()
        assert time.monotonic() - signalled >= drain_s - 0.5
