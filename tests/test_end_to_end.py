"""The whole answer path through nginx, against real processes on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from ragline_cli.stack import Stack

from conftest import TOKEN_INTERVAL_MS
from service_helpers import metric
from sse_client import read_events

QUESTION = "How long does a sourdough starter take to double in volume after feeding?"
ANSWER_DOC = "sourdough-starter.md"


def test_answer_streams_through_nginx(client: httpx.Client) -> None:
    with client.stream("POST", "/api/chat", json={"message": QUESTION}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        events = read_events(response)

    names = [e.name for e in events]
    assert names[0] == "meta"
    assert names[-1] == "done", names
    assert "error" not in names
    first_token = names.index("token")
    assert names.index("sources") < first_token

    sources = events[names.index("sources")].data["sources"]
    assert sources and sources[0]["doc_id"] == ANSWER_DOC
    assert [s["n"] for s in sources] == list(range(1, len(sources) + 1))

    tokens = [e for e in events if e.name == "token"]
    answer = "".join(e.data["text"] for e in tokens)
    assert "[1]" in answer and "four to eight hours" in answer
    # Incremental: tokens came in many network reads, spread over time as generated,
    # not in one buffered burst at the end.
    assert len({e.read for e in tokens}) > len(tokens) // 2
    spread = tokens[-1].at - tokens[0].at
    assert spread >= 0.5 * (len(tokens) - 1) * TOKEN_INTERVAL_MS / 1000, spread

    done = events[-1].data
    assert done["degraded"] == [] and done["cached"] is False
    assert done["timings"]["ttft_ms"] > 0
    assert events[0].data["request_id"] == response.headers["x-request-id"]


def test_openai_sdk_streams_through_nginx(public_url: str) -> None:
    sdk = openai.OpenAI(base_url=f"{public_url}/v1", api_key="unused", max_retries=0)
    models = [m.id for m in sdk.models.list()]
    assert "ragline" in models and "default" in models

    stream = sdk.chat.completions.create(
        model="ragline", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    chunks = list(stream)
    first = chunks[0]
    assert first.model_extra and first.model_extra["sources"][0]["doc_id"] == ANSWER_DOC
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "four to eight hours" in text
    # The citations come once the text they point into is whole, before the finish.
    annotations = chunks[-2].choices[0].delta.model_extra.get("annotations") or []
    assert annotations and annotations[0]["type"] == "url_citation"
    cite = annotations[0]["url_citation"]
    assert text[cite["start_index"] : cite["end_index"]] == "[1]"
    assert chunks[-1].choices[0].finish_reason == "stop"

    completion = sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": QUESTION}]
    )
    assert "four to eight hours" in completion.choices[0].message.content
    assert completion.model_extra["sources"][0]["doc_id"] == ANSWER_DOC


def test_client_disconnect_aborts_generation(client: httpx.Client, stack: Stack) -> None:
    llm_url = f"http://127.0.0.1:{stack.config.llm_port}"
    before = metric(llm_url, "ragline_generation_aborts_total")
    with client.stream("POST", "/api/chat", json={"message": QUESTION}) as response:
        read_events(response, stop_after="token")
    # Leaving the block closed the connection mid-answer.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = metric(llm_url, "ragline_generation_aborts_total")
        if after > before:
            break
        time.sleep(0.1)
    assert after == before + 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"message": "   "}, 422, "invalid_request"),
        ({"message": "x" * 5000}, 422, "question_too_long"),
        ({"message": QUESTION, "collection": "no_such_collection"}, 404, "collection_not_found"),
        ({"message": QUESTION, "collection": "Bad Name!"}, 422, "invalid_request"),
        ({"message": 42}, 422, "invalid_request"),
        ({"message": QUESTION, "top_k": "many"}, 422, "invalid_request"),
        ({"question": QUESTION}, 422, "invalid_request"),
    ],
)
def test_bad_input_gets_clear_json_error(
    client: httpx.Client, body: dict[str, object], status: int, code: str
) -> None:
    response = client.post("/api/chat", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["request_id"]


def test_malformed_and_oversized_bodies(client: httpx.Client, stack: Stack) -> None:
    headers = {"content-type": "application/json"}
    bad_json = client.post("/api/chat", content=b'{"message": ', headers=headers)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"

    too_big = client.post(
        "/api/chat", content=b'{"message": "' + b"a" * 400_000 + b'"}', headers=headers
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"

    sdk_bad = client.post(
        "/v1/chat/completions", json={"model": "ragline", "messages": [], "stream": True}
    )
    assert sdk_bad.status_code == 422
    n2 = client.post(
        "/v1/chat/completions",
        json={
            "model": "ragline",
            "messages": [{"role": "user", "content": QUESTION}],
            "n": 2,
        },
    )
    assert n2.status_code == 400 and n2.json()["error"]["code"] == "unsupported_parameter"

    # Every service took bad input directly, too, and is still up and ready.
    c = stack.config
    direct = {
        c.retriever_port: ("/v1/retrieve", {"query": "", "collection": "default"}),
        c.reranker_port: ("/v1/rerank", {"query": "q", "documents": []}),
        c.llm_port: ("/v1/chat/completions", {"model": "x", "messages": "nope"}),
    }
    for port, (path, body) in direct.items():
        response = httpx.post(f"http://127.0.0.1:{port}{path}", json=body)
        assert 400 <= response.status_code < 500 and "error" in response.json()
        malformed = httpx.post(f"http://127.0.0.1:{port}{path}", content=b"{", headers=headers)
        assert malformed.status_code == 400
    assert stack.dead() == []
    for port in (c.retriever_port, c.reranker_port, c.llm_port, c.gateway_port):
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200


def test_request_id_from_client_reaches_the_answer(client: httpx.Client) -> None:
    rid = "test-rid-" + str(time.time_ns())
    with client.stream(
        "POST", "/api/chat", json={"message": QUESTION}, headers={"x-request-id": rid}
    ) as r:
        events = read_events(r)
    assert r.headers["x-request-id"] == rid
    assert events[0].data["request_id"] == rid


def test_follow_up_uses_conversation_memory(client: httpx.Client) -> None:
    with client.stream("POST", "/api/chat", json={"message": "What was the Pharos?"}) as r:
        first = read_events(r)
    conversation_id = first[0].data["conversation_id"]
    # Alone, this follow-up names nothing to search for; with the conversation it does.
    # The turn is stored just after the answer, so poll briefly instead of assuming.
    follow_up = {"message": "When was it completed?", "conversation_id": conversation_id}
    deadline = time.monotonic() + 10
    while True:
        with client.stream("POST", "/api/chat", json=follow_up) as r:
            second = read_events(r)
        sources = next(e for e in second if e.name == "sources").data["sources"]
        if sources[0]["doc_id"] == "lighthouse-of-alexandria.md" or time.monotonic() > deadline:
            break
    assert sources[0]["doc_id"] == "lighthouse-of-alexandria.md"
    assert second[0].data["conversation_id"] == conversation_id


def test_cli_ingests_a_folder_and_asks(public_url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "kettle.md").write_text(
        "# The blue kettle\n\nThe blue kettle in the staff kitchen was bought in March 2019. "
        "It holds 1.7 litres of water and switches itself off when the water boils.\n"
    )
    (notes / "toaster.html").write_text(
        "<html><head><title>The toaster</title><style>p {color: red}</style></head><body>"
        "<h1>The toaster</h1><p>The toaster has four slots and a crumb tray.</p></body></html>"
    )
    ragline = [str(Path(sys.executable).parent / "ragline")]
    common = ["--url", public_url, "--collection", "cli_notes"]
    ingested = subprocess.run(
        [*ragline, "ingest", str(notes), *common], capture_output=True, text=True, timeout=120
    )
    assert ingested.returncode == 0, ingested.stderr
    assert "ingested 2 documents" in ingested.stdout
    asked = subprocess.run(
        [*ragline, "ask", "How many litres does the blue kettle hold?", *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert asked.returncode == 0, asked.stderr
    assert "1.7 litres" in asked.stdout
    assert "[1] The blue kettle  (kettle.md)" in asked.stdout
    verified = subprocess.run(
        [*ragline, "verify", "cli_notes", "--url", public_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2 chunks in the lexical index, 2 in the dense index" in verified.stdout
    assert verified.stdout.strip().endswith("consistent")


def test_document_management_passes_through_the_gateway(client: httpx.Client) -> None:
    """Jobs, files and verify reach the retriever through nginx and the gateway unchanged:
    statuses, bodies, and the job's Location rewritten to the public path."""
    docs = [{"id": "owl", "text": "The tawny owl calls at night from the old oak."}]
    response = client.post("/api/collections/e2e_jobs/jobs", json={"documents": docs})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/api/jobs/{job['job_id']}"
    deadline = time.monotonic() + 60
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job['job_id']}").json()
        time.sleep(0.05)
    assert job["status"] == "succeeded" and job["chunks"] == 1
    report = client.get("/api/collections/e2e_jobs/verify").json()
    assert report["consistent"] and report["lexical_chunks"] == 1
    upload = client.post(
        "/api/collections/e2e_jobs/files",
        params={"filename": "owl.txt"},
        content=b"Owls swallow prey whole.",
        headers={"content-type": "text/plain"},
    )
    assert upload.status_code == 202 and upload.json()["documents"] == 1
    refused = client.post("/api/collections/e2e_jobs/jobs", json={"documents": []})
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_request"
    assert client.get("/api/jobs/nope").status_code == 422
    assert client.get(f"/api/jobs/{'0' * 32}").json()["error"]["code"] == "job_not_found"
    assert client.delete("/api/collections/e2e_jobs/documents/owl").json()["deleted"] is True
