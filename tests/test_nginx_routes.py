"""Every route of README's public API table, called through nginx (the session stack's
public port) exactly as a user calls it: the status, the content type and the JSON shape
users get, and never a redirect (httpx follows none unless asked: a 3xx here fails).

The gateway's own errors pass through nginx unchanged (its codes, not nginx's), and
`/metrics` stays off the public port (Prometheus scrapes each service directly) with the
JSON 404 envelope.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from ragline_cli.stack import Stack

from nginx_helpers import logged_request_ids
from sse_client import read_events

COLLECTION = "nginx_routes"
QUESTION = "How do honeybees tell each other where flowers are?"
SOURCE_FIELDS = {"n", "doc_id", "chunk_id", "title", "url", "text", "score"}


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = client.request(method, path, follow_redirects=False, **kwargs)
    assert not response.is_redirect and not 300 <= response.status_code < 400, (
        f"{method} {path}: {response.status_code} to {response.headers.get('location')}"
    )
    return response


def json_of(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.headers.get("x-request-id")
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job = json_of(call(client, "GET", f"/api/jobs/{job_id}"), 200)
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_health_and_readiness(client: httpx.Client) -> None:
    assert json_of(call(client, "GET", "/healthz"), 200) == {"status": "ok"}
    ready = json_of(call(client, "GET", "/readyz"), 200)
    assert ready["status"] == "ready" and ready["upstreams"]["retriever"] is True


def test_metrics_are_not_served_on_the_public_port(client: httpx.Client) -> None:
    response = call(client, "GET", "/metrics", headers={"x-request-id": "metrics-1"})
    body = json_of(response, 404)
    assert body["error"]["code"] == "not_found" and body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["x-request-id"] == "metrics-1"


def test_list_collections_without_a_redirect(client: httpx.Client) -> None:
    body = json_of(call(client, "GET", "/api/collections"), 200)
    assert set(body) == {"collections"}
    names = {c["name"]: c["chunks"] for c in body["collections"]}
    assert names.get("default", 0) > 0  # the samples the session stack ingested
    assert all(set(c) == {"name", "chunks"} for c in body["collections"])


def test_a_trailing_slash_never_points_off_the_public_port(
    client: httpx.Client, public_url: str
) -> None:
    """`/api/collections/` is no route: a JSON 404, or a redirect that keeps the host
    and port the client used (nginx forwards the Host with its port)."""
    response = client.get("/api/collections/", follow_redirects=False)
    if response.is_redirect:
        location = response.headers["location"]
        assert location.startswith("/") or location.startswith(f"{public_url}/"), location
        followed = call(client, "GET", location)
        assert followed.status_code == 200
    else:
        assert response.status_code == 404
        assert json_of(response, 404)["error"]["code"]


def test_document_management_routes(client: httpx.Client) -> None:
    docs = [
        {"id": "heron", "text": "The grey heron stands still in shallow water for hours.",
         "title": "Heron", "url": "https://example.org/heron"},
    ]  # fmt: skip
    ingested = json_of(
        call(client, "POST", f"/api/collections/{COLLECTION}/documents", json={"documents": docs}),
        200,
    )
    assert ingested["collection"] == COLLECTION
    assert ingested["documents"] == 1 and ingested["chunks"] >= 1
    listed = json_of(call(client, "GET", "/api/collections"), 200)["collections"]
    assert {"name": COLLECTION, "chunks": ingested["chunks"]} in listed

    more = [{"id": "kingfisher", "text": "A kingfisher dives from a branch for small fish."}]
    accepted = call(client, "POST", f"/api/collections/{COLLECTION}/jobs", json={"documents": more})
    job = json_of(accepted, 202)
    assert accepted.headers["location"] == f"/api/jobs/{job['job_id']}"
    assert job["collection"] == COLLECTION and job["documents"] == 1
    done = wait_for_job(client, job["job_id"])
    assert done["status"] == "succeeded" and done["documents_done"] == 1, done

    uploaded = call(
        client,
        "POST",
        f"/api/collections/{COLLECTION}/files",
        params={"filename": "wren.md", "id": "wren", "title": "Wren"},
        content=b"# Wren\n\nThe wren is small and loud.",
        headers={"content-type": "text/markdown"},
    )
    file_job = json_of(uploaded, 202)
    assert uploaded.headers["location"] == f"/api/jobs/{file_job['job_id']}"
    assert file_job["documents"] == 1

    jobs = json_of(call(client, "GET", "/api/jobs"), 200)
    assert set(jobs) == {"jobs"}
    assert {job["job_id"], file_job["job_id"]} <= {j["job_id"] for j in jobs["jobs"]}
    cancelled = json_of(call(client, "DELETE", f"/api/jobs/{file_job['job_id']}"), 200)
    assert cancelled["job_id"] == file_job["job_id"]
    assert cancelled["status"] in ("cancelled", "succeeded", "queued", "running")
    wait_for_job(client, file_job["job_id"])

    report = json_of(call(client, "GET", f"/api/collections/{COLLECTION}/verify"), 200)
    assert {
        "consistent", "only_in_lexical", "only_in_dense", "pending_writes",
        "lexical_chunks", "dense_chunks",
    } <= set(report)  # fmt: skip

    deleted = json_of(call(client, "DELETE", f"/api/collections/{COLLECTION}/documents/heron"), 200)
    assert deleted == {"collection": COLLECTION, "doc_id": "heron", "deleted": True}


def test_the_gateways_own_errors_pass_through_unchanged(client: httpx.Client) -> None:
    """Not replaced by nginx's envelopes: the gateway's codes reach the client."""
    missing = call(client, "GET", f"/api/jobs/{'0' * 32}")
    assert json_of(missing, 404)["error"]["code"] == "job_not_found"
    invalid = call(
        client, "POST", "/api/chat", content=b"{", headers={"content-type": "application/json"}
    )
    assert json_of(invalid, 400)["error"]["code"] == "invalid_json"
    unknown = call(client, "GET", "/api/no-such-route")
    assert json_of(unknown, 404)["error"]["code"] == "not_found"


def test_native_chat_streams_sse(client: httpx.Client) -> None:
    with client.stream(
        "POST", "/api/chat", json={"message": QUESTION}, follow_redirects=False
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    names = [e.name for e in events]
    assert names[0] == "meta" and names[-1] == "done", names
    assert set(events[0].data) >= {"request_id", "conversation_id"}
    assert events[0].data["request_id"] == response.headers["x-request-id"]
    sources = next(e for e in events if e.name == "sources").data["sources"]
    assert sources and SOURCE_FIELDS <= set(sources[0])
    assert any(e.name == "token" and e.data["text"] for e in events)
    assert {"usage", "timings", "degraded", "cached"} <= set(events[-1].data)


def test_openai_chat_completions(client: httpx.Client) -> None:
    request = {"model": "ragline", "messages": [{"role": "user", "content": QUESTION}]}
    completion = json_of(call(client, "POST", "/v1/chat/completions", json=request), 200)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["choices"][0]["message"]["content"]
    assert completion["sources"]

    with client.stream(
        "POST", "/v1/chat/completions", json={**request, "stream": True}, follow_redirects=False
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    first = httpx.Response(200, content=lines[0].removeprefix("data:").strip()).json()
    assert first["object"] == "chat.completion.chunk" and first["sources"]


def test_models(client: httpx.Client) -> None:
    body = json_of(call(client, "GET", "/v1/models"), 200)
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    assert {"ragline", "default"} <= ids
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("route-id.1:a", True), ('a"},"request_id":"forged', False), ("x" * 129, False)],
    ids=["kept", "json", "long"],
)
def test_one_request_id_in_nginx_the_gateway_and_the_logs(
    client: httpx.Client, stack: Stack, sent: str, kept: bool
) -> None:
    """A crafted id is replaced by nginx, and the gateway keeps nginx's: the body, the
    header and nginx's access log name the same id."""
    path = f"/api/jobs/{'0' * 31}{int(kept)}?{len(sent)}"
    response = call(client, "GET", path, headers={"x-request-id": sent})
    body = json_of(response, 404)
    request_id = response.headers["x-request-id"]
    assert body["error"]["request_id"] == request_id
    assert (request_id == sent) == kept and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id)
    log = stack.config.run_dir / "nginx" / "access.log"
    assert logged_request_ids(log, f"GET {path} HTTP/1.1")[-1:] == [request_id]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_question_too_large_is_the_json_413(client: httpx.Client, path: str) -> None:
    response = call(
        client, "POST", path, content=b"x" * 300_000, headers={"content-type": "application/json"}
    )
    body = json_of(response, 413)
    assert body["error"]["code"] == "payload_too_large"
    assert body["error"]["request_id"] == response.headers["x-request-id"]
