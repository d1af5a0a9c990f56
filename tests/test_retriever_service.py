"""retriever-svc as a real process on loopback, with the real MiniLM weights."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
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
    """Chunk counts of the `kb` collection the module's tests share (other tests write
    collections of their own)."""
    body = client.get("/v1/collections").json()
    return {c["name"]: c["chunks"] for c in body["collections"] if c["name"] == "kb"}


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


def test_a_healthy_retriever_logs_no_errors(
    service: Service, client: httpx.Client, ingested: dict
) -> None:
    """An operator greps a service log for errors; a healthy one has none. Milvus Lite's
    in-process gRPC server logged a traceback for every index it built."""
    retrieve(client, "tardigrade")
    errors = [
        line
        for line in service.proc.log_path.read_text().splitlines()
        if line.startswith("{") and orjson.loads(line)["level"] in ("error", "critical")
    ]
    assert errors == []


def test_filters_restrict_results(client: httpx.Client, ingested: dict) -> None:
    body = retrieve(client, "Sicily", filters={"source": ["games", "space"]})
    assert {h["doc_id"] for h in body["hits"]} <= {"chess", "orbit"}
    assert body["hits"][0]["doc_id"] == "chess"
    body = retrieve(client, "Sicily", filters={"topic": "earth"})
    assert [h["doc_id"] for h in body["hits"]] == ["volcano"]


def test_range_filters_over_http(client: httpx.Client) -> None:
    docs = [
        {"id": f"report-{year}", "text": f"The annual harvest report for {year}.",
         "metadata": {"year": year, "published": f"{year}-03-01T09:00:00+01:00"}}
        for year in (2019, 2021, 2023)
    ]  # fmt: skip
    written = client.post("/v1/collections/ranges/documents", json={"documents": docs})
    assert written.status_code == 200, written.text

    def ids(filters: dict) -> set[str]:
        body = {"query": "annual harvest report", "collection": "ranges", "filters": filters}
        response = client.post("/v1/retrieve", json=body)
        assert response.status_code == 200, response.text
        return {h["doc_id"] for h in response.json()["hits"]}

    assert ids({"year": {"gte": 2021}}) == {"report-2021", "report-2023"}
    assert ids({"year": {"gt": 2019, "lt": 2023}}) == {"report-2021"}
    # 08:00 UTC on 1 March 2021 is exactly when report-2021 was published.
    assert ids({"published": {"gte": "2021-03-01T08:00:00Z", "lte": "2023-01-01"}}) == {
        "report-2021"
    }
    assert ids({"year": {"gte": 2021}, "doc_id": ["report-2019", "report-2023"]}) == {"report-2023"}
    for bad in ({"year": {}}, {"year": {"gte": 2020, "gt": 2019}}, {"year": {"gte": "soon"}},
                {"source": {"gte": 1}}, {"year": {"gte": 2024, "lt": 2020}}):  # fmt: skip
        body = {"query": "report", "collection": "ranges", "filters": bad}
        assert_error(client.post("/v1/retrieve", json=body), 422, "invalid_request")


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
    # A dot segment would name another document (or route) once a URL is normalised.
    dotted = client.delete("/v1/collections/kb/documents/tmp/%2E%2E/bread")
    assert_error(dotted, 422, "invalid_request")


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


def wait_for_job(client: httpx.Client, job: dict, within: float = 120) -> dict:
    """Polls a job until it ends (or `within` seconds pass); its last state."""
    deadline = time.monotonic() + within
    while True:
        state = client.get(f"/v1/jobs/{job['job_id']}").json()
        if state["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_an_ingest_job_runs_in_batches_and_reports_progress(client: httpx.Client) -> None:
    docs = [
        {"id": f"note-{i}", "text": f"Field note {i}: the heron number {i} fished at dawn."}
        for i in range(70)
    ]
    docs[42]["text"] = "A kingfisher dived into the millpond and came up with a minnow."
    response = client.post("/v1/collections/jobs_kb/jobs", json={"documents": docs})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['job_id']}"
    assert job["status"] in ("queued", "running") and job["documents"] == 70
    seen_progress = set()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job['job_id']}").json()
        seen_progress.add(job["documents_done"])
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    assert job["documents_done"] == 70 and job["progress"] == 1.0 and job["chunks"] == 70
    assert seen_progress <= {0, 32, 64, 70}  # progress moves batch by batch
    hits = client.post(
        "/v1/retrieve", json={"query": "kingfisher millpond", "collection": "jobs_kb"}
    ).json()["hits"]
    assert hits[0]["doc_id"] == "note-42"
    listed = client.get("/v1/jobs", params={"collection": "jobs_kb"}).json()["jobs"]
    assert [j["job_id"] for j in listed] == [job["job_id"]]
    report = client.get("/v1/collections/jobs_kb/verify").json()
    assert report["consistent"] and report["lexical_chunks"] == report["dense_chunks"] == 70
    assert_error(client.get(f"/v1/jobs/{'0' * 32}"), 404, "job_not_found")
    assert_error(client.get("/v1/jobs/not-a-job"), 422, "invalid_request")
    no_docs = client.post("/v1/collections/jobs_kb/jobs", json={"documents": []})
    assert_error(no_docs, 422, "invalid_request")


def test_files_are_parsed_by_format_and_bad_files_refused(client: httpx.Client) -> None:
    html = (
        b"<html><head><title>Lighthouse log</title><script>var x = 'nope';</script></head>"
        b"<body><h1>Lighthouse log</h1><p>The keeper trimmed the wick at &amp; after dusk.</p>"
        b"<h2>Storms</h2><p>A gale broke the lantern glass in November.</p></body></html>"
    )
    markdown = b"---\ntitle: Garden notes\n---\n# Garden notes\n\nThe quince tree fruited.\n"
    uploads = [
        ("log.html", "text/html", html, "lighthouse lantern gale", "log.html"),
        ("garden.md", "text/markdown", markdown, "quince tree fruited", "garden.md"),
    ]
    for filename, content_type, body, query, doc_id in uploads:
        response = client.post(
            "/v1/collections/files_kb/files",
            params={"filename": filename, "metadata": '{"kind": "upload"}'},
            content=body,
            headers={"content-type": content_type},
        )
        assert response.status_code == 202, response.text
        assert wait_for_job(client, response.json())["status"] == "succeeded"
        hit = client.post(
            "/v1/retrieve",
            json={"query": query, "collection": "files_kb", "filters": {"kind": "upload"}},
        ).json()["hits"][0]
        assert hit["doc_id"] == doc_id and hit["source"] == filename
        assert "var x" not in hit["text"] and "---" not in hit["text"]
    assert hit["title"] == "Garden notes"
    # JSON documents name their format; HTML is read as text, its <title> the title.
    as_json = {"id": "page", "text": html.decode(), "format": "html"}
    written = client.post("/v1/collections/files_kb/documents", json={"documents": [as_json]})
    assert written.status_code == 200, written.text
    hit = client.post(
        "/v1/retrieve",
        json={"query": "lantern glass", "collection": "files_kb", "filters": {"doc_id": "page"}},
    ).json()["hits"][0]
    assert (
        hit["title"] == "Lighthouse log" and "<p>" not in hit["text"] and "&amp;" not in hit["text"]
    )
    pdf_in_json = {"id": "p", "text": "%PDF-1.4", "format": "pdf"}
    refused_json = client.post(
        "/v1/collections/files_kb/documents", json={"documents": [pdf_in_json]}
    )
    assert_error(refused_json, 422, "invalid_request")
    refused = [
        ({"filename": "scan.pdf"}, "application/pdf", b"%PDF-1.4 not really a pdf"),
        ({"filename": "empty.txt"}, "text/plain", b""),
        ({"filename": "data.bin"}, "application/octet-stream", b"\x00\x01"),
        ({"filename": "x.txt", "metadata": "[1, 2]"}, "text/plain", b"some text"),
    ]
    for params, content_type, body in refused:
        response = client.post(
            "/v1/collections/files_kb/files",
            params=params,
            content=body,
            headers={"content-type": content_type},
        )
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["message"]


def test_verify_compares_the_stores(client: httpx.Client, ingested: dict) -> None:
    report = client.get("/v1/collections/kb/verify").json()
    assert report == {
        "collection": "kb",
        "consistent": True,
        "lexical_chunks": 4,
        "dense_chunks": 4,
        "only_in_lexical": [],
        "only_in_dense": [],
        "only_in_lexical_count": 0,
        "only_in_dense_count": 0,
        "pending_writes": 0,
    }
    assert_error(client.get("/v1/collections/absent/verify"), 404, "collection_not_found")


VERSION = re.compile(r"^([0-9a-f]{16})-(\d+)$")


def version(client: httpx.Client, collection: str) -> tuple[str, int]:
    """(epoch, counter) of `collection`'s index version, read over HTTP."""
    response = client.get(f"/v1/collections/{collection}/version")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"collection", "version"} and body["collection"] == collection
    match = VERSION.match(body["version"])
    assert match, body
    return match[1], int(match[2])


def test_the_index_version_changes_with_every_write_and_only_then(client: httpx.Client) -> None:
    epoch, count = version(client, "versioned")
    assert count == 0  # never written: still a valid cache key
    doc = {"id": "owl", "text": "Barn owls hunt voles at night over rough grassland."}
    written = client.post("/v1/collections/versioned/documents", json={"documents": [doc]})
    assert written.status_code == 200, written.text
    assert version(client, "versioned") == (epoch, 2)  # once per index
    body = {"query": "barn owl voles", "collection": "versioned"}
    assert client.post("/v1/retrieve", json=body).json()["hits"][0]["doc_id"] == "owl"
    assert version(client, "versioned") == (epoch, 2)  # a search changes nothing
    assert client.get("/v1/collections/versioned/verify").json()["consistent"]
    assert version(client, "versioned") == (epoch, 2)
    deleted = client.delete("/v1/collections/versioned/documents/owl")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert version(client, "versioned") == (epoch, 4)
    assert version(client, "versioned_other") == (epoch, 0)  # collections are independent
    bad = client.get("/v1/collections/Bad-Name/version")
    assert_error(bad, 422, "invalid_request")


def test_lexical_outage_degrades_to_dense(service: Service, base: Path, ingested: dict) -> None:
    """Runs last: it replaces the module's service by one whose lexical backend is an
    Elasticsearch that is down (a free port nobody listens on). The index version of
    `kb` survives the restart, and the write only dense applies bumps it once."""
    with httpx.Client(base_url=service.url, timeout=60) as c:
        epoch, count = version(c, "kb")
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
            assert version(c, "kb") == (epoch, count)  # kept across the restart
            assert ready.json()["status"] == "degraded"
            assert ready.json()["degraded"] == ["lexical"]
            body = retrieve(c, "Why does dough rise when you bake bread?")
            assert body["degraded"] == ["lexical"]
            assert body["hits"][0]["doc_id"] == "bread"
            assert all(h["ranks"]["lexical"] is None for h in body["hits"])
            assert metric(degraded.url, "ragline_retriever_degraded_total", backend="lexical") == 1
            # Writes need both stores: a clear 503, not a half-written success; the
            # write is journaled for the lexical store and will be replayed.
            write = c.post("/v1/collections/kb/documents", json={"documents": DOCS[:1]})
            assert_error(write, 503, "index_write_pending")
            assert write.headers["retry-after"]
            assert metric(degraded.url, "ragline_retriever_pending_writes") == 1
            assert version(c, "kb") == (epoch, count + 1)  # dense applied it, lexical owes it
