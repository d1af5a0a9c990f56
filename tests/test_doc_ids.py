"""Document ids as users have them (issue 20): parentheses, spaces, accents, `/ % ? # & +`.

- The rule (ragline_common.wire): any Unicode text of 1 to 512 bytes of UTF-8 but for
  control characters, whitespace at either end and `.`/`..` segments; checked against
  an independent reading of that rule on random text (hypothesis).
- Where an id goes: a URL path segment (percent-encoded), a chunk id (at most 512 bytes,
  Elasticsearch's `_id` limit), a citation URL, a file name read by `ragline ingest`, a
  BEIR corpus (SQuAD's `Sky_(United_Kingdom)-3` kept as it is).
- Through nginx → gateway → retriever (the session stack): awkward and random ids are
  ingested, found by `doc_id` filters, checked by `verify`, deleted by their
  percent-encoded path and ingested again; invalid ones get a 422 naming the problem.

The stores themselves (every backend, injection attempts included) are checked in
tests/test_retriever_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragline_cli.documents import iter_documents, iter_uploads
from ragline_common.wire import (
    MAX_DOC_ID_BYTES,
    DocumentIn,
    doc_id_from_name,
    doc_id_path,
    doc_id_problem,
    is_doc_id,
)
from ragline_gateway.citations import passage_url
from ragline_gateway.pipeline import Source
from ragline_retriever.app import build_app
from ragline_retriever.chunking import MAX_CHUNK_ID_BYTES, chunk_id
from ragline_retriever.evaluation.beir import service_doc_ids
from ragline_retriever.settings import RetrieverSettings

from doc_id_samples import AWKWARD_IDS, SEED, random_doc_ids

# As tests/test_evaluation.py finds it: CI puts shared/ beside the clone.
SQUAD_CORPUS = Path(__file__).resolve().parents[2] / "shared/data/squad-dev/corpus.jsonl"

# --- the rule -----------------------------------------------------------------------------

INVALID = [
    ("", "empty"),
    (" leading", "whitespace"),
    ("trailing ", "whitespace"),
    ("\u3000ideographic space", "whitespace"),
    ("nbsp at the end\u00a0", "whitespace"),
    ("line\nbreak", "control characters"),
    ("tab\there", "control characters"),
    ("del\x7f", "control characters"),
    ("c1\x85", "control characters"),
    ("nul\x00", "control characters"),
    ("line\u2028separator", "control characters"),
    ("right-to-left \u202eoverride", "control characters"),
    ("isolate \u2066x\u2069", "control characters"),
    ("lone \ud800 surrogate", "Unicode"),
    ("x" * 513, "512 bytes"),
    ("é" * 257, "512 bytes"),
    (".", "segments"),
    ("..", "segments"),
    ("a/../b", "segments"),
    ("a/./b", "segments"),
    ("./a", "segments"),
    ("a/..", "segments"),
    ("../etc/passwd", "segments"),
]


@pytest.mark.parametrize("doc_id", AWKWARD_IDS)
def test_awkward_ids_are_valid(doc_id: str) -> None:
    assert doc_id_problem(doc_id) is None
    assert DocumentIn(id=doc_id, text="x").id == doc_id


@pytest.mark.parametrize(("doc_id", "problem"), INVALID)
def test_what_cannot_be_safe_is_refused_with_its_reason(doc_id: str, problem: str) -> None:
    found = doc_id_problem(doc_id)
    assert found is not None and problem in found, found
    with pytest.raises(ValueError, match="id"):
        DocumentIn(id=doc_id, text="x")


def test_ids_valid_under_the_old_rule_stay_valid() -> None:
    """The rule before issue 20: `[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}` without `.`/`..`
    segments; every such id is valid now, so stored documents keep their ids."""
    old = [
        "Normans-0",
        "a",
        "docs/guide/install.md",
        "user@example.com:notes/2024-05-01.v2",
        "x" * 256,
        "a/.../b",
        "0.1.2",
    ]
    assert all(is_doc_id(i) for i in old)


_BIDI_CONTROLS = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _reference(value: str) -> bool:
    """The rule as README states it, written apart from the code under test."""
    if any(unicodedata.category(c) in {"Cc", "Cs", "Zl", "Zp"} for c in value):
        return False
    if any(ord(c) in _BIDI_CONTROLS for c in value):
        return False
    if not 1 <= len(value.encode()) <= 512:
        return False
    if value[0].isspace() or value[-1].isspace():
        return False
    return not any(part in (".", "..") for part in value.split("/"))


_ID_TEXT = st.text(
    st.one_of(
        st.characters(),
        st.characters(codec="utf-8"),
        st.sampled_from(["/", ".", " ", "\u00a0", "\n", "\x85", "\u202e", "\ud800", "#", "%"]),
    ),
    max_size=40,
) | st.text(st.characters(), min_size=120, max_size=300)


@settings(max_examples=400, deadline=None)
@given(_ID_TEXT)
def test_the_rule_is_what_readme_says(value: str) -> None:
    assert is_doc_id(value) == _reference(value), (value, doc_id_problem(value))


@settings(max_examples=300, deadline=None)
@given(_ID_TEXT)
def test_a_file_name_is_its_own_id_where_valid_and_a_valid_id_anyway(name: str) -> None:
    made = doc_id_from_name(name)
    assert is_doc_id(made), (name, made)
    if is_doc_id(name):
        assert made == name


def test_names_that_are_not_ids_become_the_nearest_valid_one() -> None:
    assert doc_id_from_name("Report (v2).pdf") == "Report (v2).pdf"
    assert doc_id_from_name("Report [v2].pdf") == "Report [v2].pdf"
    assert doc_id_from_name("tab\tin/./name.md") == "tab-in/name.md"
    assert doc_id_from_name(" spaced .txt ") == "spaced .txt"
    assert doc_id_from_name("..") == doc_id_from_name("") == "document"
    long = doc_id_from_name("é" * 300)
    assert long == "é" * 256 and len(long.encode()) == MAX_DOC_ID_BYTES


_VALID_IDS = _ID_TEXT.filter(is_doc_id) | st.sampled_from(AWKWARD_IDS)


@settings(max_examples=300, deadline=None)
@given(_VALID_IDS)
def test_a_path_segment_decodes_to_the_id_and_holds_no_syntax(doc_id: str) -> None:
    segment = doc_id_path(doc_id)
    assert unquote(segment, errors="strict") == doc_id
    assert segment.isascii()
    assert not set(segment) & set("/?#&+ ;=")
    assert segment not in (".", "..")


@settings(max_examples=300, deadline=None)
@given(_VALID_IDS, st.integers(0, 10**6))
def test_chunk_ids_fit_elasticsearch_and_milvus_and_name_their_document(
    doc_id: str, position: int
) -> None:
    made = chunk_id(doc_id, position)
    assert len(made.encode()) <= MAX_CHUNK_ID_BYTES
    head, _, tail = made.rpartition("#")
    assert tail == str(position)
    if head != doc_id:  # the hashed form: never another valid document's plain chunk id
        assert len(f"{doc_id}#{position}".encode()) > MAX_CHUNK_ID_BYTES
        assert not is_doc_id(head)
    assert chunk_id(doc_id, position) == made  # stable


def test_long_ids_that_share_a_start_get_different_chunk_ids() -> None:
    first, second = "x" * 510 + "ab", "x" * 510 + "ac"
    assert chunk_id(first, 0) != chunk_id(second, 0)
    assert chunk_id("x" * 400, 3) == "x" * 400 + "#3"  # short enough: the plain form


def test_citation_urls_stay_urls() -> None:
    def source(doc_id: str, url: str = "") -> Source:
        return Source(1, doc_id, chunk_id(doc_id, 2), "t", url, "text", 1.0)

    assert passage_url(source("docs/guide.md")) == "ragline:doc/docs/guide.md#chunk-2"
    assert passage_url(source("100% sure? #1")) == "ragline:doc/100%25%20sure%3F%20%231#chunk-2"
    assert passage_url(source("Crème", "https://x.test/c#old")) == "https://x.test/c#chunk-2"
    long = source("x" * 512)
    url = passage_url(long)
    assert url.startswith("ragline:doc/" + "x" * 512 + "#") and url.count("#") == 1


# --- file names and corpora ---------------------------------------------------------------


def test_ragline_ingest_keeps_file_names_as_ids(tmp_path: Path) -> None:
    (tmp_path / "Crème brûlée").mkdir()
    for name in ("Report (v2).md", "Report [v2].md", "Crème brûlée/n°1 & more.txt"):
        (tmp_path / name).write_text(f"# {name}\n\nSome text.", encoding="utf-8")
    (tmp_path / "Report (v2).html").write_text("<p>x</p>", encoding="utf-8")
    ids = {doc["id"] for doc in iter_documents(tmp_path)}
    assert ids == {"Report (v2).md", "Report [v2].md", "Crème brûlée/n°1 & more.txt"}
    assert [doc_id for _, doc_id, _ in iter_uploads(tmp_path)] == ["Report (v2).html"]


def squad_ids() -> list[str]:
    if not SQUAD_CORPUS.is_file():
        pytest.skip(f"{SQUAD_CORPUS} is absent (CI puts shared/ beside the clone)")
    with SQUAD_CORPUS.open(encoding="utf-8") as lines:
        return [json.loads(line)["_id"] for line in lines if line.strip()]


def test_the_evaluation_keeps_squad_ids_as_they_are() -> None:
    ids = squad_ids()
    assert len(ids) == 173 and "Sky_(United_Kingdom)-3" in ids
    assert service_doc_ids(ids) == {i: i for i in ids}


# --- through nginx, gateway and retriever (the session stack) -----------------------------

COLLECTION = "doc_ids"


def documents_path(doc_id: str | None = None, collection: str = COLLECTION) -> str:
    base = f"/api/collections/{collection}/documents"
    return base if doc_id is None else f"{base}/{doc_id_path(doc_id)}"


def document(doc_id: str, n: int) -> dict[str, Any]:
    return {
        "id": doc_id,
        "title": doc_id,
        "text": f"The lighthouse keeper logged storm number {n} in the harbour book.",
    }


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (response.request.url, response.text)
    return response.json()


def sources_for(client: httpx.Client, filters: dict[str, Any], collection: str) -> list[dict]:
    """The sources of an answer restricted by `filters` (one token is enough for them)."""
    body = {
        "model": "ragline",
        "collection": collection,
        "messages": [{"role": "user", "content": "Which storm did the lighthouse keeper log?"}],
        "filters": filters,
        "top_k": 20,
        "max_tokens": 1,
        "source_max_drop": None,
        "source_min_score": None,
    }
    return ok(client.post("/v1/chat/completions", json=body))["sources"]


def chunks_in(client: httpx.Client, collection: str) -> int:
    listed = ok(client.get("/api/collections"))["collections"]
    return next((c["chunks"] for c in listed if c["name"] == collection), 0)


def test_awkward_and_random_ids_round_trip_through_nginx(client: httpx.Client) -> None:
    doc_ids = AWKWARD_IDS + random_doc_ids(12)
    print(f"document id seed {SEED} (RAGLINE_TEST_ID_SEED replays it)")
    docs = [document(d, n) for n, d in enumerate(doc_ids)]
    ingested = ok(client.post(documents_path(), json={"documents": docs}))
    assert ingested["documents"] == len(doc_ids)
    chunks = ingested["chunks"]
    assert chunks_in(client, COLLECTION) == chunks

    report = ok(client.get(f"/api/collections/{COLLECTION}/verify"))
    assert report["consistent"], report
    found = {s["doc_id"] for s in sources_for(client, {"doc_id": doc_ids}, COLLECTION)}
    assert found and found <= set(doc_ids)
    for doc_id in doc_ids[::4]:
        sources = sources_for(client, {"doc_id": doc_id}, COLLECTION)
        assert sources and {s["doc_id"] for s in sources} == {doc_id}, doc_id
        assert {s["title"] for s in sources} == {doc_id}

    for doc_id in doc_ids:
        deleted = ok(client.delete(documents_path(doc_id)))
        assert deleted == {"collection": COLLECTION, "doc_id": doc_id, "deleted": True}
    assert chunks_in(client, COLLECTION) == 0
    again = ok(client.delete(documents_path(AWKWARD_IDS[0])))
    assert again["deleted"] is False

    # Ingested again, the same ids are the same documents (re-sending replaces).
    for _ in range(2):
        ok(client.post(documents_path(), json={"documents": docs[:8]}))
    assert 0 < chunks_in(client, COLLECTION) <= chunks
    for doc_id in doc_ids[:8]:
        assert ok(client.delete(documents_path(doc_id)))["deleted"] is True
    assert chunks_in(client, COLLECTION) == 0


def test_a_client_that_leaves_slashes_plain_reaches_the_same_document(
    client: httpx.Client,
) -> None:
    doc_id = "plain slashes//a (b)/c"  # nginx merges `//` only to choose a location
    ok(client.post(documents_path(), json={"documents": [document(doc_id, 1)]}))
    path = f"/api/collections/{COLLECTION}/documents/{quote(doc_id, safe='/')}"
    assert ok(client.delete(path)) == {"collection": COLLECTION, "doc_id": doc_id, "deleted": True}


def test_an_uploaded_file_takes_its_id_from_the_query(client: httpx.Client) -> None:
    doc_id = "Report (v2) & notes/naïve #1?.md"
    accepted = client.post(
        f"/api/collections/{COLLECTION}/files",
        params={"filename": "Report (v2).md", "id": doc_id},
        content=b"# Report\n\nThe lighthouse keeper logged storm number 7.",
        headers={"content-type": "text/markdown"},
    )
    job = ok(accepted, 202)
    deadline = time.monotonic() + 60
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = ok(client.get(f"/api/jobs/{job['job_id']}"))
    assert job["status"] == "succeeded", job
    assert ok(client.delete(documents_path(doc_id)))["deleted"] is True


@pytest.mark.parametrize(("doc_id", "problem"), [i for i in INVALID if i[0] and len(i[0]) < 300])
def test_invalid_ids_get_a_clear_422(client: httpx.Client, doc_id: str, problem: str) -> None:
    body = json.dumps({"documents": [{"id": doc_id, "text": "x"}]})  # a lone surrogate too
    refused = client.post(
        documents_path(), content=body, headers={"content-type": "application/json"}
    )
    error = ok(refused, 422)["error"]
    assert error["code"] == "invalid_request", error
    # A lone surrogate is refused by the JSON parser already ("... unicode string").
    assert problem.lower() in error["message"].lower(), error
    assert error["message"].startswith("documents.0.id: ")


@pytest.mark.parametrize(
    ("segment", "status", "code"),
    [
        (quote(" leading", safe=""), 422, "invalid_request"),
        ("a%C2%85b", 422, "invalid_request"),  # NEXT LINE, a C1 control
        ("a%E2%80%AEb", 422, "invalid_request"),  # RIGHT-TO-LEFT OVERRIDE
        # The gateway refuses C0 controls in any path (hardening.py), before the route.
        ("a%0Ab", 400, "invalid_path"),
        ("a%0A", 400, "invalid_path"),  # not document "a"
        ("a%2F.%2Fb", 422, "invalid_request"),
        ("x" * 513, 422, "invalid_request"),
        # nginx refuses a `..` segment itself, plain or encoded, before any route.
        # (httpx would resolve a plain `..` itself before sending it.)
        ("a%2F..%2Fb", 400, "bad_request"),
        ("%2E%2E", 400, "bad_request"),
    ],
)
def test_invalid_ids_in_the_path_are_refused(
    client: httpx.Client, segment: str, status: int, code: str
) -> None:
    refused = client.delete(f"/api/collections/{COLLECTION}/documents/{segment}")
    error = ok(refused, status)["error"]
    assert error["code"] == code and error["message"], error


def test_the_squad_corpus_ingests_with_its_own_ids(client: httpx.Client) -> None:
    """All 173 paragraphs, 47 of them with parentheses in their ids (`Sky_(United_
    Kingdom)-3`), accepted through nginx as they are."""
    ids = squad_ids()
    with SQUAD_CORPUS.open(encoding="utf-8") as lines:
        corpus = [json.loads(line) for line in lines if line.strip()]
    docs = [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in corpus]
    collection = "squad_ids"
    ingested = ok(client.post(documents_path(collection=collection), json={"documents": docs}))
    assert ingested["documents"] == len(ids) == 173
    body = {
        "model": collection,
        "messages": [{"role": "user", "content": "What is Sky UK's parent company?"}],
        "filters": {"doc_id": "Sky_(United_Kingdom)-3"},
        "max_tokens": 1,
    }
    sources = ok(client.post("/v1/chat/completions", json=body))["sources"]
    assert {s["doc_id"] for s in sources} == {"Sky_(United_Kingdom)-3"}
    deleted = ok(client.delete(documents_path("Victoria_(Australia)-0", collection)))
    assert deleted["deleted"] is True


# --- the retriever's own route (internal API), without a runtime --------------------------


@pytest.mark.parametrize(
    ("segment", "status"),
    [
        (doc_id_path("Sky_(United_Kingdom)-3"), 503),
        (doc_id_path("a/b?c#d e%f"), 503),
        ("plain/slashes (ok)", 503),
        ("a%0A", 422),  # Starlette's `path` convertor routed this as document "a"
        ("a%0Ab", 422),
        ("%20lead", 422),
        ("a%2F..%2Fb", 422),
    ],
)
def test_the_retriever_checks_the_id_it_is_sent(tmp_path: Path, segment: str, status: int) -> None:
    """Valid ids reach the handler (503 `not_ready`: no runtime is opened here), invalid
    ones are a 422 before it, line breaks included."""
    app = build_app(RetrieverSettings(data_dir=tmp_path))

    async def delete() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://retriever") as c:
            return await c.delete(f"/v1/collections/kb/documents/{segment}")

    response = asyncio.run(delete())
    expected = "not_ready" if status == 503 else "invalid_request"
    assert ok(response, status)["error"]["code"] == expected
