"""The gateway with a slow, then a frozen, llm-svc of its own, through the repo's nginx:

- a client that leaves aborts its generation, streamed or not, and frees its stream slot;
- a frozen llm-svc (SIGSTOP: it still accepts connections, answers nothing) is known down
  from the gateway's health probes within seconds, and new questions get their 503 at once
  instead of after the 60 s first-token timeout; it answers again once thawed.

The session stack's retriever and reranker serve; llm-svc, the gateway and nginx are this
module's own, so freezing llm-svc disturbs no other test.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from ragline_cli.processes import free_port, nginx
from ragline_cli.stack import REPO_ROOT, Stack

from service_helpers import Service, assert_error, gateway_env, metric, poll, running_service

QUESTION = "How do honeybees tell each other where flowers are?"
# A long, slow answer: 2,000 words 10 ms apart is 20 s, far longer than any test waits.
LLM_ENV = {
    "RAGLINE_LLM_ENGINE": "fixed",
    "RAGLINE_LLM_FIXED_TOKENS": "2000",
    "RAGLINE_LLM_TOKEN_INTERVAL_MS": "10",
}


@dataclass
class Rig:
    llm: Service
    gateway: Service
    nginx_port: int

    @property
    def public(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"


@pytest.fixture(scope="module")
def rig(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("upstream-faults")
    with running_service("llm-faults", "ragline_llm", LLM_ENV, tmp / "logs") as llm:
        env = gateway_env(
            stack.config,
            llm_url=llm.url,
            cache_ttl_s="0",
            requests_per_minute="0",
            max_streams_per_key="0",
            allow_anonymous="true",
            # The defaults the issue measured against: 60 s to the first token.
            llm_first_token_timeout_s="60",
        )
        with running_service("gateway-faults", "ragline_gateway", env, tmp / "logs") as gw:
            port = free_port()
            proxy = nginx(port, f"127.0.0.1:{gw.port}", tmp / "nginx", REPO_ROOT / "web")
            proxy.start()
            try:
                proxy.wait_ready(30)
                yield Rig(llm, gw, port)
            finally:
                proxy.stop()


def raw_request(port: int, path: str, body: dict[str, object]) -> socket.socket:
    """A request on a socket of our own, so the test decides exactly when the client goes."""
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def active_streams(rig: Rig) -> float:
    return metric(rig.gateway.url, "ragline_active_streams")


def aborts(rig: Rig) -> float:
    return metric(rig.llm.url, "ragline_generation_aborts_total")


def generating(rig: Rig) -> bool:
    return metric(rig.llm.url, "ragline_llm_active_requests") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_a_client_that_leaves_aborts_its_generation(rig: Rig, stream: bool) -> None:
    before = aborts(rig)
    body = {"model": "ragline", "messages": [{"role": "user", "content": QUESTION}]}
    sock = raw_request(rig.nginx_port, "/v1/chat/completions", {**body, "stream": stream})
    try:
        poll(lambda: generating(rig) and active_streams(rig) == 1, 30, "the answer to start")
    finally:
        sock.close()  # the client goes, 20 s before the answer would end
    # nginx closes its upstream connection, the gateway closes llm-svc's stream, llm-svc
    # aborts the generation in its engine; the stream slot is free again.
    poll(lambda: aborts(rig) == before + 1, 10, "llm-svc to abort the generation")
    poll(lambda: active_streams(rig) == 0, 10, "the gateway to free the stream slot")
    assert metric(rig.llm.url, "ragline_llm_active_requests") == 0
    if not stream:  # logged as the client closing, not as a 200 "completed"
        log = rig.gateway.proc.log_path.read_text().splitlines()
        last = [orjson.loads(line) for line in log if '"ragline.access"' in line][-1]
        assert last["path"] == "/v1/chat/completions" and last["status"] == 499


def test_a_frozen_llm_fails_new_questions_fast_and_recovers(rig: Rig) -> None:
    with httpx.Client(base_url=rig.public, timeout=30) as client:
        assert client.post("/api/chat", json={"message": QUESTION, "top_k": 1}).status_code == 200
        os.kill(rig.llm.proc.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            poll(
                lambda: metric(rig.gateway.url, "ragline_upstream_up", upstream="llm") == 0,
                30, "the gateway to see llm-svc down",
            )  # fmt: skip
            started = time.monotonic()
            for path, body in (
                ("/api/chat", {"message": QUESTION}),
                ("/v1/chat/completions", {"model": "ragline", "stream": True,
                                          "messages": [{"role": "user", "content": QUESTION}]}),
            ):  # fmt: skip
                # A 30 s client timeout: without the health watch this waits 60 s.
                response = client.post(path, json=body)
                assert_error(response, 503, "generation_unavailable")
                assert response.headers["retry-after"]
            took = time.monotonic() - started
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["upstreams"]["llm"] is False
        finally:
            os.kill(rig.llm.proc.proc.pid, signal.SIGCONT)
        poll(
            lambda: metric(rig.gateway.url, "ragline_upstream_up", upstream="llm") == 1,
            30, "the gateway to see llm-svc back",
        )  # fmt: skip
        with client.stream("POST", "/api/chat", json={"message": QUESTION}) as response:
            assert response.status_code == 200
        print(f"two questions to a frozen llm-svc answered 503 in {took:.2f}s")


def test_the_health_watch_never_marks_a_live_upstream_down(rig: Rig) -> None:
    # The reranker and the retriever were up all along (only llm-svc was frozen).
    for upstream in ("retriever", "reranker"):
        assert metric(rig.gateway.url, "ragline_upstream_up", upstream=upstream) == 1
