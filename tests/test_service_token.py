"""Defence in depth behind the gateway, on real processes (issue 21).

- The internal services (retriever, reranker, llm-svc) with `SERVICE_TOKEN` set answer
  only requests carrying it in `X-Ragline-Service-Token`: 401 with the error envelope
  otherwise, /healthz and /readyz excepted (ragline_common/service_token.py).
- A gateway with the same token answers end to end through all three; one with another
  token gets refused upstream, which its clients see as the upstream being unavailable
  (never as their own 401), and the token never appears in a log.
- `METRICS_PORT`: /metrics on a port of its own (no token there), 404 on the service port.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ragline_cli.processes import free_port
from ragline_common.service import create_app
from ragline_common.service_token import HEADER, service_tokens, token_to_send
from ragline_common.settings import ServiceSettings

from service_helpers import (
    Service,
    assert_error,
    chat_events,
    event,
    metric,
    running_service,
)

pytestmark = pytest.mark.slow

TOKEN = secrets.token_hex(24)
WRONG = secrets.token_hex(24)
REFUSED = "invalid_service_token"
COLLECTION = "tokens"
DOC = {
    "id": "okapi",
    "title": "Okapi",
    "text": "The okapi is a giraffid of the Ituri rainforest; its legs are striped like a zebra's.",
}
QUESTION = "Where does the okapi live?"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {HEADER: token}


# --- the check itself, in process --------------------------------------------------------


def _app(setting: str) -> FastAPI:
    app = create_app("token probe", service_token=setting)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/thing")
    async def thing() -> dict[str, bool]:
        return {"ok": True}

    return app


def test_tokens_parse_and_the_gateway_sends_the_first() -> None:
    assert service_tokens("") == ()
    assert service_tokens(" a , ,b,") == ("a", "b")
    assert token_to_send("new,old") == "new"
    assert token_to_send("") == ""


def test_every_route_but_the_probes_needs_a_listed_token() -> None:
    """Rotation: during it a service lists two tokens and accepts either."""
    with TestClient(_app("old, new")) as client:
        for token in ("old", "new"):
            assert client.post("/v1/thing", headers=auth(token)).json() == {"ok": True}
        missing = client.post("/v1/thing")
        assert_error(missing, 401, REFUSED)
        assert "missing" in missing.json()["error"]["message"]
        for token in ("older", "ol", "old,new", ""):
            assert_error(client.post("/v1/thing", headers=auth(token)), 401, REFUSED)
        # Unknown paths and /metrics (on the service port) are behind it too.
        assert_error(client.get("/nowhere"), 401, REFUSED)
        assert_error(client.get("/metrics"), 401, REFUSED)
        assert client.get("/metrics", headers=auth("new")).status_code == 200
        # The kubelet's probes are not.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_no_token_set_means_none_required() -> None:
    with TestClient(_app("")) as client:
        assert client.post("/v1/thing").json() == {"ok": True}


def test_metrics_port_must_differ_from_the_service_port() -> None:
    with pytest.raises(ValidationError, match="metrics_port"):
        ServiceSettings(port=8001, metrics_port=8001)
    assert ServiceSettings().metrics_port == 0  # default: /metrics on the service port
    assert ServiceSettings().service_token.get_secret_value() == ""


# --- real processes ----------------------------------------------------------------------


@dataclass
class Internal:
    retriever: Service
    retriever_metrics: int
    reranker: Service
    llm: Service
    logs: Path


@pytest.fixture(scope="module")
def internal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internal]:
    """Retriever (with a metrics port), reranker and llm-svc, all requiring TOKEN."""
    tmp = tmp_path_factory.mktemp("service-token")
    logs = tmp / "logs"
    metrics_port = free_port()
    retriever_env = {
        "RAGLINE_RETRIEVER_DATA_DIR": str(tmp / "data"),
        "RAGLINE_RETRIEVER_SERVICE_TOKEN": TOKEN,
        "RAGLINE_RETRIEVER_METRICS_PORT": str(metrics_port),
    }
    with (
        running_service("retriever-token", "ragline_retriever", retriever_env, logs) as retriever,
        running_service(
            "reranker-token",
            "ragline_reranker",
            {"RAGLINE_RERANKER_SERVICE_TOKEN": TOKEN},
            logs,
        ) as reranker,
        running_service(
            "llm-token",
            "ragline_llm",
            {"RAGLINE_LLM_SERVICE_TOKEN": TOKEN, "RAGLINE_LLM_TOKEN_INTERVAL_MS": "0"},
            logs,
            ready_timeout=60,
        ) as llm,
    ):
        yield Internal(retriever, metrics_port, reranker, llm, logs)


def gateway_env(internal: Internal, token: str, metrics_port: int | None = None) -> dict[str, str]:
    env = {
        "RAGLINE_GATEWAY_RETRIEVER_URL": internal.retriever.url,
        "RAGLINE_GATEWAY_RERANKER_URL": internal.reranker.url,
        "RAGLINE_GATEWAY_LLM_URL": internal.llm.url,
        "RAGLINE_GATEWAY_ALLOW_ANONYMOUS": "true",
        "RAGLINE_GATEWAY_DEFAULT_COLLECTION": COLLECTION,
        "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0",
        "RAGLINE_GATEWAY_MAX_TOKENS": "30",
        # The reranker's scores, not `auto` (which skips a reranker-svc without a
        # cross-encoder): the answer below then needs the reranker to accept the token.
        "RAGLINE_GATEWAY_RANKING": "reranker",
        "RAGLINE_GATEWAY_SERVICE_TOKEN": token,
    }
    if metrics_port is not None:
        env["RAGLINE_GATEWAY_METRICS_PORT"] = str(metrics_port)
    return env


@dataclass
class Gateway:
    service: Service
    metrics_port: int


@pytest.fixture(scope="module")
def gateway(internal: Internal) -> Iterator[Gateway]:
    port = free_port()
    env = gateway_env(internal, TOKEN, port)
    with running_service("gateway-token", "ragline_gateway", env, internal.logs) as svc:
        yield Gateway(svc, port)


def test_the_retriever_refuses_reads_writes_and_deletes_without_the_token(
    internal: Internal,
) -> None:
    url = internal.retriever.url
    write = {"documents": [DOC]}
    retrieve = {"query": "okapi", "collection": COLLECTION}
    delete = f"{url}/v1/collections/{COLLECTION}/documents/okapi"
    for headers in ({}, auth(WRONG)):
        assert_error(
            httpx.post(f"{url}/v1/collections/{COLLECTION}/documents", json=write,
                       headers=headers, timeout=30),
            401, REFUSED,
        )  # fmt: skip
        assert_error(
            httpx.post(f"{url}/v1/retrieve", json=retrieve, headers=headers, timeout=30),
            401,
            REFUSED,
        )
        assert_error(httpx.delete(delete, headers=headers, timeout=30), 401, REFUSED)
        assert_error(httpx.get(f"{url}/v1/collections", headers=headers, timeout=30), 401, REFUSED)
    # The probes stay open.
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200

    # With the token: write, read, delete.
    written = httpx.post(
        f"{url}/v1/collections/{COLLECTION}/documents", json=write, headers=auth(), timeout=60
    )
    assert written.status_code == 200, written.text
    found = httpx.post(f"{url}/v1/retrieve", json=retrieve, headers=auth(), timeout=30)
    assert found.status_code == 200, found.text
    assert found.json()["hits"][0]["doc_id"] == "okapi"
    gone = httpx.delete(delete, headers=auth(), timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] is True, gone.text


def test_the_reranker_and_llm_svc_refuse_without_the_token(internal: Internal) -> None:
    rerank = {"query": "okapi", "documents": ["an okapi", "a zebra"], "top_n": 1}
    chat = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    calls = [
        ("POST", f"{internal.reranker.url}/v1/rerank", rerank),
        ("POST", f"{internal.llm.url}/v1/chat/completions", chat),
        ("GET", f"{internal.llm.url}/v1/models", None),
    ]
    for method, url, body in calls:
        for headers in ({}, auth(WRONG)):
            r = httpx.request(method, url, json=body, headers=headers, timeout=30)
            assert_error(r, 401, REFUSED)
        ok = httpx.request(method, url, json=body, headers=auth(), timeout=60)
        assert ok.status_code == 200, (url, ok.text)
    for svc in (internal.reranker, internal.llm):
        assert httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200


def test_a_gateway_with_the_token_answers_end_to_end(gateway: Gateway) -> None:
    url = gateway.service.url
    written = httpx.post(
        f"{url}/api/collections/{COLLECTION}/documents", json={"documents": [DOC]}, timeout=60
    )
    assert written.status_code == 200, written.text
    events = chat_events(url, {"message": QUESTION})
    sources = event(events, "sources")["sources"]
    assert sources and sources[0]["doc_id"] == "okapi"
    done = event(events, "done")
    assert done["degraded"] == [], done  # retrieved, reranked (ranking=reranker)...
    assert "".join(e.data["text"] for e in events if e.name == "token")  # ... and generated
    assert httpx.get(f"{url}/api/collections", timeout=30).status_code == 200


def test_a_gateway_with_another_token_is_refused_upstream(
    internal: Internal, gateway: Gateway
) -> None:
    env = gateway_env(internal, WRONG)
    with running_service("gateway-wrong-token", "ragline_gateway", env, internal.logs) as wrong:
        r = httpx.post(
            f"{wrong.url}/api/collections/{COLLECTION}/documents",
            json={"documents": [DOC]},
            timeout=60,
        )
        # The retriever's 401 is the gateway's misconfiguration, not the caller's.
        assert_error(r, 503, "retriever_unavailable")
        r = httpx.post(f"{wrong.url}/api/chat", json={"message": QUESTION}, timeout=60)
        assert r.status_code == 503, r.text
        log = wrong.proc.log_path.read_text()
    assert "refused the gateway's service token" in log


def test_no_log_holds_a_token(internal: Internal, gateway: Gateway) -> None:
    """Run after the requests above (module order): right and wrong tokens were sent."""
    texts = [p.read_text() for p in internal.logs.iterdir() if p.is_file()]
    assert texts
    for text in texts:
        assert TOKEN not in text and WRONG not in text
    assert any("request refused: no valid service token" in t for t in texts)


# --- metrics on a port of their own -------------------------------------------------------


def test_metrics_move_to_their_own_port(internal: Internal, gateway: Gateway) -> None:
    cases = [
        (internal.retriever.url, internal.retriever_metrics, "ragline_retriever"),
        (gateway.service.url, gateway.metrics_port, "ragline_"),
    ]
    for url, port, prefix in cases:
        metrics_url = f"http://127.0.0.1:{port}"
        # The service port no longer serves them (the retriever checks the token first).
        r = httpx.get(f"{url}/metrics", headers=auth(), timeout=10)
        assert_error(r, 404, "not_found")
        # The metrics port does, without a token, and serves nothing else.
        r = httpx.get(f"{metrics_url}/metrics", timeout=10)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert prefix in r.text and "process_cpu_seconds_total" in r.text
        for path in ("/v1/retrieve", "/api/chat", "/healthz", "/docs", "/openapi.json"):
            assert httpx.get(f"{metrics_url}{path}", timeout=10).status_code == 404, path
    # What the service port served is counted there, read on the metrics port.
    served = metric(
        f"http://127.0.0.1:{gateway.metrics_port}", "http_requests_total", handler="/api/chat"
    )
    assert served >= 1


def test_a_taken_metrics_port_stops_the_start() -> None:
    """A metrics port that cannot be bound fails the start (before the lifespan loads
    anything), rather than leaving a service that Prometheus cannot see."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            "RAGLINE_LLM_PORT": str(free_port()),
            "RAGLINE_LLM_METRICS_PORT": str(taken.getsockname()[1]),
            "RAGLINE_LLM_SHUTDOWN_DRAIN_S": "0",
        }
        done = subprocess.run(
            [sys.executable, "-m", "ragline_llm"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode != 0
    assert "address already in use" in done.stderr.lower(), done.stderr[-2000:]
    assert "llm engine ready" not in done.stderr
