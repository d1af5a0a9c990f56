"""API keys and tenant isolation, against a gateway process of its own with a keys file,
on the session stack's retriever, reranker, llm-svc and Redis.

Two tenants hold documents that answer the same question differently; whatever a key of
one tenant asks, names or filters, it never gets a source of the other's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.stack import Stack

from service_helpers import (
    Service,
    assert_error,
    bearer,
    chat_events,
    event,
    gateway_env,
    poll,
    running_service,
    write_keys,
)

QUESTION = "What colour is the lamp of the harbour lighthouse?"
DOCS = {
    "acme_docs": {
        "id": "acme-lighthouse",
        "title": "Acme harbour lighthouse",
        "text": "The harbour lighthouse of Acme Bay has a green lamp. Its keeper is Ada.",
    },
    "globex_docs": {
        "id": "globex-lighthouse",
        "title": "Globex harbour lighthouse",
        "text": "The harbour lighthouse of Globex Point has a violet lamp. Its keeper is Hank.",
    },
}
ENTRIES = [
    {"id": "acme-chat", "tenant": "acme", "scopes": ["chat"], "collections": ["acme_docs"]},
    {"id": "acme-admin", "tenant": "acme", "scopes": ["admin", "chat"],
     "collections": ["acme_*"]},
    {"id": "globex-chat", "tenant": "globex", "scopes": ["chat"],
     "collections": ["globex_docs"]},
    {"id": "globex-admin", "tenant": "globex", "scopes": ["admin"],
     "collections": ["globex_*"]},
]  # fmt: skip


class Keyed:
    def __init__(self, svc: Service, keys: dict[str, str], keys_path: Path) -> None:
        self.url = svc.url
        self.svc = svc
        self.keys = keys
        self.keys_path = keys_path

    def call(self, method: str, path: str, key_id: str | None, **kw: Any) -> httpx.Response:
        headers = bearer(self.keys[key_id]) if key_id else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    tmp = tmp_path_factory.mktemp("tenants")
    keys_path = tmp / "keys.json"
    keys = write_keys(keys_path, ENTRIES)
    env = gateway_env(
        stack.config,
        api_keys_file=str(keys_path),
        keys_reload_interval_s="0.2",
        default_collection="acme_docs",
        requests_per_minute="0",
        max_tokens="24",
    )
    with running_service("gateway-tenants", "ragline_gateway", env, tmp / "logs") as svc:
        g = Keyed(svc, keys, keys_path)
        for collection, doc in DOCS.items():
            admin = "acme-admin" if collection.startswith("acme") else "globex-admin"
            response = g.call(
                "POST", f"/api/collections/{collection}/documents", admin,
                json={"documents": [{**doc, "metadata": {"kind": "lighthouse"}}]},
            )  # fmt: skip
            assert response.status_code == 200, response.text
        yield g


def source_docs(events: list[Any]) -> set[str]:
    return {s["doc_id"] for s in event(events, "sources")["sources"]}


def test_no_key_or_a_wrong_key_is_401(gw: Keyed) -> None:
    for headers in ({}, {"authorization": "Bearer rl-not-a-key"}, {"authorization": "Basic x"}):
        r = httpx.post(f"{gw.url}/api/chat", json={"message": QUESTION}, headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    # Auth comes before the body is judged: no hint about the API to a caller without a key.
    assert_error(httpx.post(f"{gw.url}/api/chat", json={"nonsense": 1}), 401, "unauthorized")
    assert_error(httpx.get(f"{gw.url}/v1/models"), 401, "unauthorized")
    assert_error(httpx.get(f"{gw.url}/api/collections"), 401, "unauthorized")


def test_each_tenant_sees_only_its_own_documents(gw: Keyed) -> None:
    acme = chat_events(gw.url, {"message": QUESTION}, gw.keys["acme-chat"])
    assert source_docs(acme) == {"acme-lighthouse"}
    assert "violet" not in "".join(e.data["text"] for e in acme if e.name == "token")
    globex = chat_events(
        gw.url, {"message": QUESTION, "collection": "globex_docs"}, gw.keys["globex-chat"]
    )
    assert source_docs(globex) == {"globex-lighthouse"}


def test_naming_another_tenants_collection_is_403(gw: Keyed) -> None:
    body = {"message": QUESTION, "collection": "globex_docs"}
    assert_error(gw.call("POST", "/api/chat", "acme-chat", json=body), 403, "collection_forbidden")
    for model_fields in (
        {"model": "globex_docs"},
        {"model": "ragline", "collection": "globex_docs"},
    ):
        r = gw.call(
            "POST", "/v1/chat/completions", "acme-chat",
            json={**model_fields, "messages": [{"role": "user", "content": QUESTION}]},
        )  # fmt: skip
        assert_error(r, 403, "collection_forbidden")
    # A collection nobody owns is refused the same way: no hint of what exists.
    body = {"message": QUESTION, "collection": "nobody_docs"}
    assert_error(gw.call("POST", "/api/chat", "acme-chat", json=body), 403, "collection_forbidden")


def test_filters_cannot_reach_across_tenants(gw: Keyed) -> None:
    for filters in ({"doc_id": "globex-lighthouse"}, {"kind": "lighthouse"},
                    {"doc_id": ["globex-lighthouse", "acme-lighthouse"]}):  # fmt: skip
        events = chat_events(gw.url, {"message": QUESTION, "filters": filters},
                             gw.keys["acme-chat"])  # fmt: skip
        assert source_docs(events) <= {"acme-lighthouse"}, filters


def test_models_lists_only_the_keys_collections(gw: Keyed) -> None:
    """And the generation model itself, last: it reads no collection."""
    r = gw.call("GET", "/v1/models", "acme-chat")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["ragline", "acme_docs", "ragline-extractive"]
    r = gw.call("GET", "/v1/models", "globex-chat")
    assert [m["id"] for m in r.json()["data"]] == ["ragline", "globex_docs", "ragline-extractive"]


def test_document_management_needs_admin_and_stays_in_the_tenant(gw: Keyed) -> None:
    doc = {"documents": [{"id": "x", "text": "intruder text"}]}
    assert_error(gw.call("GET", "/api/collections", "acme-chat"), 403, "forbidden")
    r = gw.call("POST", "/api/collections/acme_docs/documents", "acme-chat", json=doc)
    assert_error(r, 403, "forbidden")
    r = gw.call("POST", "/api/collections/globex_docs/documents", "acme-admin", json=doc)
    assert_error(r, 403, "collection_forbidden")
    r = gw.call("DELETE", "/api/collections/globex_docs/documents/globex-lighthouse", "acme-admin")
    assert_error(r, 403, "collection_forbidden")
    # The chat key of globex still finds its document: nothing above touched it.
    events = chat_events(
        gw.url, {"message": QUESTION, "collection": "globex_docs"}, gw.keys["globex-chat"]
    )
    assert source_docs(events) == {"globex-lighthouse"}

    names = [
        c["name"] for c in gw.call("GET", "/api/collections", "acme-admin").json()["collections"]
    ]
    assert "acme_docs" in names
    assert all(n.startswith("acme_") for n in names), names

    # A job of globex: acme's admin cannot see, list or cancel it.
    r = gw.call("POST", "/api/collections/globex_jobs/jobs", "globex-admin",
                json={"documents": [{"id": "j1", "text": "a globex job document"}]})  # fmt: skip
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert_error(gw.call("GET", f"/api/jobs/{job_id}", "acme-admin"), 404, "job_not_found")
    assert_error(gw.call("DELETE", f"/api/jobs/{job_id}", "acme-admin"), 404, "job_not_found")
    listed = gw.call("GET", "/api/jobs", "acme-admin").json()["jobs"]
    assert job_id not in {j["job_id"] for j in listed}
    assert gw.call("GET", f"/api/jobs/{job_id}", "globex-admin").status_code == 200


def test_conversations_are_per_tenant(gw: Keyed) -> None:
    conversation = {"conversation_id": "shared-conversation-id"}
    chat_events(gw.url, {"message": QUESTION, "collection": "globex_docs", **conversation},
                gw.keys["globex-chat"])  # fmt: skip
    follow_up = {"message": "Who keeps it?", **conversation}
    # The same conversation id under acme is a new conversation: no history to lean on.
    acme = chat_events(gw.url, follow_up, gw.keys["acme-chat"])
    assert "search_query" not in event(acme, "done")
    # Under globex it is a follow-up, searched together with the question before it.
    globex = chat_events(gw.url, {**follow_up, "collection": "globex_docs"},
                         gw.keys["globex-chat"])  # fmt: skip
    assert event(globex, "done")["search_query"] == f"{QUESTION} Who keeps it?"


def test_keys_rotate_without_a_restart(gw: Keyed) -> None:
    from ragline_gateway.auth import hash_key, new_key

    fresh = new_key()
    body = orjson.loads(gw.keys_path.read_bytes())
    body["keys"].append({"id": "acme-new", "tenant": "acme", "sha256": hash_key(fresh),
                         "scopes": ["chat"], "collections": ["acme_docs"]})  # fmt: skip
    gw.keys_path.write_bytes(orjson.dumps(body))

    def status(key: str) -> int:
        return httpx.get(f"{gw.url}/v1/models", headers=bearer(key), timeout=10).status_code

    poll(lambda: status(fresh) == 200, 10, "the new key is accepted")
    # A broken file keeps the keys in force.
    gw.keys_path.write_text("{not json")
    assert status(fresh) == 200
    body["keys"] = [k for k in body["keys"] if k["id"] != "acme-new"]
    gw.keys_path.write_bytes(orjson.dumps(body))
    poll(lambda: status(fresh) == 401, 10, "the removed key is refused")
    assert status(gw.keys["acme-chat"]) == 200
