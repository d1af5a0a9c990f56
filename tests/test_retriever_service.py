"""retriever-svc as a real process on loopback, with the real MiniLM weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragline_cli.processes import free_port

from service_helpers import Service, assert_error, metric, running_service

pytestmark = pytest.mark.slow

MAX_BODY = 200_000
DOCS = [
    {
        "id": "volcano",
        "title": "Volcanoes",
        "text": "A volcano is an opening in the crust through which lava, ash and gases "
        "escape. Mount Etna in Sicily is one of the most active volcanoes in Europe.",
        "source": "geo",
        "metadata": {"topic": "earth"},
    },
    {
        "id": "bread",
        "title": "Baking bread",
        "text": "Bread dough rises because yeast ferments sugars and releases carbon dioxide. "
        "Kneading develops gluten, which traps the gas.",
        "source": "food",
        "metadata": {"topic": "kitchen"},
    },
    {
        "id": "chess",
        "title": "Chess openings",
        "text": "The Sicilian Defence is a chess opening that begins 1.e4 c5. It is the "
        "most popular response to the king's pawn opening.",
        "source": "games",
    },
    {
        "id": "orbit",
        "title": "Orbits",
        "text": "The Moon orbits the Earth roughly every 27.3 days, and the Earth orbits "
        "the Sun once a year.",
        "source": "space",
    },
]


def retriever_env(base: Path, **extra: str) -> dict[str, str]:
    return {
        "RAGLINE_RETRIEVER_DATA_DIR": str(base / "data"),
        "RAGLINE_RETRIEVER_MAX_BODY_BYTES": str(MAX_BODY),
        **extra,
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's retriever keeps its data under base/data and its logs under base/logs."""
    return tmp_path_factory.mktemp("retriever")


@pytest.fixture(scope="module")
def service(base: Path) -> Iterator[Service]:
    env = retriever_env(base)
    with running_service("retriever", "ragline_retriever", env, base / "logs") as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ingested(client: httpx.Client) -> dict:
    response = client.post("/v1/collections/kb/documents", json={"documents": DOCS})
    assert response.status_code == 200, response.text
    return response.json()


def retrieve(client: httpx.Client, query: str, **extra: object) -> dict:
    response = client.post("/v1/retrieve", json={"query": query, "collection": "kb", **extra})
    assert response.status_code == 200, response.text
    return response.json()


def chunk_counts(client: httpx.Client) -> dict[str, int]:
    body = client.get("/v1/collections").json()
    return {c["name"]: c["chunks"] for c in body["collections"]}


def test_ready_reports_both_backends(client: httpx.Client) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["backends"]["lexical"] == {"backend": "tantivy", "ok": True}
    assert body["backends"]["dense"] == {"backend": "milvus", "ok": True}


def test_question_puts_the_answering_document_first(client: httpx.Client, ingested: dict) -> None:
    assert ingested == {**ingested, "collection": "kb", "documents": 4, "chunks": 4}
    cases = {
        "Why does dough rise when you bake bread?": "bread",
        "How long does the Moon take to go around the Earth?": "orbit",
        "Which active volcano is in Sicily?": "volcano",
    }
    for question, expected in cases.items():
        body = retrieve(client, question, top_k=3)
        assert body["degraded"] == []
        top = body["hits"][0]
        assert top["doc_id"] == expected, (question, body["hits"])
        assert top["chunk_id"] == f"{expected}#0"
        assert set(top["ranks"]) == {"lexical", "dense"}
        assert top["ranks"]["dense"] is not None
        assert set(body["timings"]) >= {"lexical_ms", "dense_ms", "total_ms"}
        assert len(body["hits"]) <= 3
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)


def test_filters_restrict_results(client: httpx.Client, ingested: dict) -> None:
    body = retrieve(client, "Sicily", filters={"source": ["games", "space"]})
    assert {h["doc_id"] for h in body["hits"]} <= {"chess", "orbit"}
    assert body["hits"][0]["doc_id"] == "chess"
    body = retrieve(client, "Sicily", filters={"topic": "earth"})
    assert [h["doc_id"] for h in body["hits"]] == ["volcano"]


def test_reingest_changes_nothing(client: httpx.Client, ingested: dict) -> None:
    before = chunk_counts(client)
    first = retrieve(client, "yeast and gluten")
    again = client.post("/v1/collections/kb/documents", json={"documents": DOCS})
    assert again.status_code == 200 and again.json()["chunks"] == ingested["chunks"]
    assert chunk_counts(client) == before == {"kb": 4}
    second = retrieve(client, "yeast and gluten")
    assert [h["chunk_id"] for h in second["hits"]] == [h["chunk_id"] for h in first["hits"]]


def test_delete_removes_a_document(client: httpx.Client, ingested: dict) -> None:
    doc = {"id": "tmp/doc-1", "text": "Quokkas are small marsupials living on Rottnest Island."}
    assert client.post("/v1/collections/kb/documents", json={"documents": [doc]}).is_success
    assert retrieve(client, "quokka marsupial")["hits"][0]["doc_id"] == "tmp/doc-1"
    response = client.delete("/v1/collections/kb/documents/tmp/doc-1")
    assert response.status_code == 200
    assert response.json() == {"collection": "kb", "doc_id": "tmp/doc-1", "deleted": True}
    assert "tmp/doc-1" not in {h["doc_id"] for h in retrieve(client, "quokka marsupial")["hits"]}
    again = client.delete("/v1/collections/kb/documents/tmp/doc-1")
    assert again.status_code == 200 and again.json()["deleted"] is False
    assert chunk_counts(client) == {"kb": 4}
    assert_error(client.delete("/v1/collections/nope/documents/x"), 404, "collection_not_found")


def test_bad_requests_get_the_envelope_and_the_service_keeps_serving(
    client: httpx.Client, ingested: dict
) -> None:
    unknown = client.post("/v1/retrieve", json={"query": "volcano", "collection": "absent"})
    assert_error(unknown, 404, "collection_not_found")
    malformed = client.post(
        "/v1/retrieve", content=b'{"query": ', headers={"content-type": "application/json"}
    )
    assert_error(malformed, 400, "invalid_json")
    for body in (
        {"query": 5, "collection": "kb"},
        {"query": "   ", "collection": "kb"},
        {"query": "x" * 4001, "collection": "kb"},
        {"query": "x", "collection": "kb", "top_k": 0},
        {"query": "x", "collection": "Bad-Name"},
        {"query": "x", "collection": "kb", "filters": {"bad key": "x"}},
        {"query": "x", "unexpected": True},
    ):
        assert_error(client.post("/v1/retrieve", json=body), 422, "invalid_request")
    bad_collection = client.post("/v1/collections/Bad-Name/documents", json={"documents": DOCS})
    assert_error(bad_collection, 422, "invalid_request")
    no_docs = client.post("/v1/collections/kb/documents", json={"documents": []})
    assert_error(no_docs, 422, "invalid_request")
    huge = {"documents": [{"id": "big", "text": "word " * (MAX_BODY // 4)}]}
    assert_error(client.post("/v1/collections/kb/documents", json=huge), 413, "payload_too_large")
    # Still serving, and nothing was written by the refused requests.
    assert retrieve(client, "Which active volcano is in Sicily?")["hits"][0]["doc_id"] == "volcano"
    assert chunk_counts(client) == {"kb": 4}


def test_metrics_count_what_happened(
    service: Service, client: httpx.Client, ingested: dict
) -> None:
    url = service.url
    assert metric(url, "ragline_retriever_ingested_chunks_total") >= 4
    count = "ragline_retriever_search_duration_seconds_count"
    before = metric(url, count, backend="dense")
    retrieve(client, "bread")
    assert metric(url, count, backend="dense") == before + 1
    assert metric(url, "ragline_retriever_embedding_duration_seconds_count", kind="query") >= 1


def test_lexical_outage_degrades_to_dense(service: Service, base: Path, ingested: dict) -> None:
    """Runs last: it replaces the module's service by one whose lexical backend is an
    Elasticsearch that is down (a free port nobody listens on)."""
    service.proc.stop()
    env = retriever_env(
        base,
        RAGLINE_RETRIEVER_LEXICAL_BACKEND="elasticsearch",
        RAGLINE_RETRIEVER_ES_URL=f"http://127.0.0.1:{free_port()}",
    )
    with running_service("retriever-es-down", "ragline_retriever", env, base / "logs") as degraded:
        with httpx.Client(base_url=degraded.url, timeout=60) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert ready.json()["degraded"] == ["lexical"]
            body = retrieve(c, "Why does dough rise when you bake bread?")
            assert body["degraded"] == ["lexical"]
            assert body["hits"][0]["doc_id"] == "bread"
            assert all(h["ranks"]["lexical"] is None for h in body["hits"])
            assert metric(degraded.url, "ragline_retriever_degraded_total", backend="lexical") == 1
            # Writes need both stores: a clear 503, not a half-written success.
            write = c.post("/v1/collections/kb/documents", json={"documents": DOCS[:1]})
            assert_error(write, 503, "index_unavailable")
