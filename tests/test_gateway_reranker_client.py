"""The gateway's reranker client against stand-ins for third-party rerank servers.

Hugging Face text-embeddings-inference (TEI) cannot run here, so a small stand-in on
loopback speaks its `/rerank` protocol as TEI documents it: `{query, texts, truncate,
raw_scores?, return_text?}` → `[{index, score}]` best first, 413 past its client batch
size (32 by default), 413 for an over-long input unless `truncate` is true. The same
server answers in the common rerank shape on `/v1/rerank` for the malformed-answer cases.
(The client against reranker-svc itself is in test_reranker_service.py.)
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.settings import GatewaySettings

TEI_MAX_CLIENT_BATCH = 32
TEI_MAX_INPUT_CHARS = 2_000  # stands in for TEI's token limit
TEI_FIELDS = {"query", "texts", "truncate", "raw_scores", "return_text", "truncation_direction"}


def overlap_score(query: str, text: str) -> float:
    """A deterministic stand-in relevance: shared words, ties broken by text length."""
    q = set(query.lower().split())
    return len(q & set(text.lower().split())) + 1 / (1 + len(text))


@dataclass
class StandIn:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    rerank_answer: Any = None  # what /v1/rerank answers (malformed-answer tests)


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            state.requests.append(body)
            state.headers.append({k.lower(): v for k, v in self.headers.items()})
            if self.path == "/v1/rerank":
                self._send(200, state.rerank_answer)
                return
            if self.path != "/rerank":
                self._send(404, {"error": "not found", "error_type": "NotFound"})
                return
            if set(body) - TEI_FIELDS or not isinstance(body.get("texts"), list):
                self._send(422, {"error": "bad request body", "error_type": "Validation"})
                return
            texts = body["texts"]
            if len(texts) > TEI_MAX_CLIENT_BATCH:
                message = f"batch size {len(texts)} > maximum allowed batch size 32"
                self._send(413, {"error": message, "error_type": "Validation"})
                return
            if not body.get("truncate") and any(len(t) > TEI_MAX_INPUT_CHARS for t in texts):
                self._send(413, {"error": "input too long", "error_type": "Validation"})
                return
            ranked = sorted(
                (
                    {"index": i, "score": overlap_score(body["query"], t)}
                    for i, t in enumerate(texts)
                ),
                key=lambda r: r["score"],
                reverse=True,
            )
            self._send(200, ranked)

    return Handler


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    state = StandIn(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="tei-stand-in", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def rerank(client: RerankerClient, query: str, documents: list[str], top_n: int) -> Any:
    async def go() -> list[tuple[int, float]]:
        try:
            return await client.rerank(query, documents, top_n=top_n, timeout=10)
        finally:
            await client.aclose()

    return asyncio.run(go())


QUERY = "how hot does water boil at sea level"
DOCUMENTS = [
    f"passage {i}: " + ("water boils at sea level " if i % 7 == 3 else "stock markets and sonnets ")
    + "filler " * (i % 5) + "z" * i  # distinct lengths: no ties in the ranking
    for i in range(50)
]  # fmt: skip


def expected_ranking(documents: list[str], top_n: int) -> list[int]:
    order = sorted(range(len(documents)), key=lambda i: overlap_score(QUERY, documents[i]))
    return list(reversed(order))[:top_n]


def test_tei_adapter_splits_past_the_client_batch_size_and_merges(stand_in: StandIn) -> None:
    client = RerankerClient(stand_in.url, pool_size=4, api="tei")
    ranked = rerank(client, QUERY, DOCUMENTS, top_n=5)

    # Indices point into the caller's 50 documents, best first, as if one request.
    assert [i for i, _ in ranked] == expected_ranking(DOCUMENTS, 5)
    assert [s for _, s in ranked] == [overlap_score(QUERY, DOCUMENTS[i]) for i, _ in ranked]
    assert {i % 7 for i, _ in ranked} == {3}  # the relevant passages, from both halves
    assert max(i for i, _ in ranked) >= TEI_MAX_CLIENT_BATCH

    # The two parts go out concurrently, so they may arrive in either order.
    assert sorted(len(r["texts"]) for r in stand_in.requests) == [18, 32]
    assert all(r["truncate"] is True and r["query"] == QUERY for r in stand_in.requests)


def test_tei_adapter_asks_for_truncation(stand_in: StandIn) -> None:
    long_docs = ["water boils " * 1000, "short passage about sea level"]
    ranked = rerank(RerankerClient(stand_in.url, 4, api="tei"), QUERY, long_docs, top_n=2)
    assert sorted(i for i, _ in ranked) == [0, 1]


def test_tei_errors_become_upstream_errors(stand_in: StandIn) -> None:
    client = RerankerClient(stand_in.url, 4, api="tei", max_documents=40)  # past TEI's 32
    with pytest.raises(UpstreamError) as err:
        rerank(client, QUERY, DOCUMENTS, top_n=5)
    assert err.value.status == 413 and err.value.upstream == "reranker"


def test_settings_choose_the_protocol_path_model_and_key(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_URL", stand_in.url)
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_MODEL", "BAAI/bge-reranker-base")
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_API_KEY", "s3cret")
    stand_in.rerank_answer = {"results": [{"index": 1, "relevance_score": 0.9},
                                          {"index": 0, "relevance_score": 0.1}]}  # fmt: skip
    client = RerankerClient.from_settings(GatewaySettings(), pool_size=4)
    assert client.api == "rerank" and client.path == "/v1/rerank"
    assert client.health_path == "/readyz"  # what reranker-svc answers
    assert rerank(client, QUERY, ["a", "b"], top_n=5) == [(1, 0.9), (0, 0.1)]
    assert stand_in.requests[-1] == {
        "query": QUERY, "documents": ["a", "b"], "top_n": 2, "model": "BAAI/bge-reranker-base"
    }  # fmt: skip
    assert stand_in.headers[-1]["authorization"] == "Bearer s3cret"

    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_API", "tei")
    tei = RerankerClient.from_settings(GatewaySettings(), pool_size=4)
    assert (tei.api, tei.path, tei.max_documents) == ("tei", "/rerank", 32)
    assert tei.health_path == "/health"  # TEI has no /readyz: the gateway probes /health
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_HEALTH_PATH", "/ping")
    assert RerankerClient.from_settings(GatewaySettings(), pool_size=1).health_path == "/ping"
    asyncio.run(tei.aclose())


@pytest.mark.parametrize(
    "answer",
    [
        {"results": [{"index": 2, "relevance_score": 0.5}]},  # index past the documents
        {"results": [{"index": 0, "score": 0.5}]},  # TEI's key in the rerank shape
        {"results": [{"index": "0", "relevance_score": 0.5}]},
        {"results": [{"index": 0, "relevance_score": None}]},
        {"data": []},
        [{"index": 0, "relevance_score": 0.5}],
    ],
    ids=[
        "index-out-of-range",
        "wrong-score-key",
        "string-index",
        "null-score",
        "no-results",
        "bare-list",
    ],
)
def test_a_malformed_rerank_answer_is_an_upstream_error(stand_in: StandIn, answer: Any) -> None:
    stand_in.rerank_answer = answer
    with pytest.raises(UpstreamError, match="malformed rerank response"):
        rerank(RerankerClient(stand_in.url, 4), QUERY, ["a", "b"], top_n=2)
