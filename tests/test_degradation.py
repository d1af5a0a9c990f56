"""Failing dependencies give the degraded answers of ARCHITECTURE.md, not errors.

Each test starts its own gateway (and, for the lexical case, its own retriever) next to
the shared stack, so the shared stack stays healthy for the other tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import httpx

from ragline_cli.processes import free_port
from ragline_cli.stack import Stack

from conftest import SAMPLES
from service_helpers import Service, running_service
from sse_client import read_events

QUESTION = "How do honeybees tell each other where flowers are?"
READY_TIMEOUT = 180


def gateway(
    log_dir: Path, retriever: int, reranker: int, llm: int
) -> AbstractContextManager[Service]:
    env = {
        "RAGLINE_GATEWAY_RETRIEVER_URL": f"http://127.0.0.1:{retriever}",
        "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{reranker}",
        "RAGLINE_GATEWAY_LLM_URL": f"http://127.0.0.1:{llm}",
        "RAGLINE_GATEWAY_RERANK_TIMEOUT_S": "2",
        "RAGLINE_GATEWAY_ALLOW_ANONYMOUS": "true",
    }
    # Alive, not ready: /readyz is rightly 503 while llm-svc or the retriever is down.
    return running_service(
        "gateway-degraded", "ragline_gateway", env, log_dir, READY_TIMEOUT, ready_path="/healthz"
    )


def retriever(name: str, env: dict[str, str], log_dir: Path) -> AbstractContextManager[Service]:
    return running_service(name, "ragline_retriever", env, log_dir, READY_TIMEOUT)


def ask(url: str) -> list:
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/api/chat", json={"message": QUESTION}) as response:
            assert response.status_code == 200, response.read()
            return read_events(response)


def test_reranker_down_uses_fused_order(stack: Stack, tmp_path: Path) -> None:
    c = stack.config
    dead_reranker = free_port()  # nothing listens there: the reranker is down
    with gateway(tmp_path, c.retriever_port, dead_reranker, c.llm_port) as gw:
        events = ask(gw.url)
    names = [e.name for e in events]
    assert names[-1] == "done" and "token" in names
    assert events[-1].data["degraded"] == ["rerank"]
    sources = next(e for e in events if e.name == "sources").data["sources"]
    assert sources[0]["doc_id"] == "honeybee-waggle-dance.md"


def test_lexical_backend_down_answers_from_dense(stack: Stack, tmp_path: Path) -> None:
    c = stack.config
    base_env = {"RAGLINE_RETRIEVER_DATA_DIR": str(tmp_path / "retriever")}
    # Fill both stores while everything is healthy ...
    with retriever("retriever-a", base_env, tmp_path) as healthy:
        docs = [
            {"id": p.name, "title": p.stem, "text": p.read_text()}
            for p in sorted(SAMPLES.glob("*.md"))
        ]
        response = httpx.post(
            f"{healthy.url}/v1/collections/default/documents", json={"documents": docs}, timeout=300
        )
        assert response.status_code == 200, response.text
    # ... then serve the same dense store with the lexical backend unreachable
    # (Elasticsearch configured at an address where nothing listens: a real outage).
    outage_env = {
        **base_env,
        "RAGLINE_RETRIEVER_LEXICAL_BACKEND": "elasticsearch",
        "RAGLINE_RETRIEVER_ES_URL": f"http://127.0.0.1:{free_port()}",
        "RAGLINE_RETRIEVER_LEXICAL_TIMEOUT_S": "2",
    }
    with retriever("retriever-b", outage_env, tmp_path) as degraded:
        with gateway(tmp_path, degraded.port, c.reranker_port, c.llm_port) as gw:
            events = ask(gw.url)
    assert events[-1].name == "done"
    assert events[-1].data["degraded"] == ["lexical"]
    sources = next(e for e in events if e.name == "sources").data["sources"]
    assert sources[0]["doc_id"] == "honeybee-waggle-dance.md"


def test_llm_down_is_a_clear_503(stack: Stack, tmp_path: Path) -> None:
    c = stack.config
    with gateway(tmp_path, c.retriever_port, c.reranker_port, free_port()) as gw:
        response = httpx.post(f"{gw.url}/api/chat", json={"message": QUESTION}, timeout=60)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "generation_unavailable"
    assert response.headers["retry-after"]


def test_retriever_down_is_a_clear_503(stack: Stack, tmp_path: Path) -> None:
    c = stack.config
    with gateway(tmp_path, free_port(), c.reranker_port, c.llm_port) as gw:
        response = httpx.post(f"{gw.url}/api/chat", json={"message": QUESTION}, timeout=60)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "retrieval_unavailable"
