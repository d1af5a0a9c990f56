"""The Elasticsearch backend against a stand-in server on loopback.

No Elasticsearch can run on this machine (FACTS.md), so these tests pin down what the
backend sends (the index template, the bulk lines, the search DSL of each filter kind) and
how it reads Elasticsearch's answers (a mapping conflict, a missing index, no server). The
stand-in only records requests and replays canned answers; whether Elasticsearch then
behaves as the contract says is what tests/test_retriever_contract.py checks wherever
`RAGLINE_TEST_ES_URL` names a real cluster.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ragline_cli.processes import free_port
from ragline_retriever.backends.base import (
    BackendUnavailable,
    Chunk,
    CollectionNotFound,
    MetadataConflict,
    WriteRefused,
)
from ragline_retriever.backends.elasticsearch_index import ElasticsearchIndex

PREFIX = "t-"
MAY_1 = 1714521600.0  # 2024-05-01T00:00:00Z
MAY_1_10H = MAY_1 + 10 * 3600


@dataclass
class Seen:
    """One request as the stand-in received it."""

    method: str
    path: str
    params: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


Answer = Callable[[Seen], tuple[int, Any]]


class StandIn:
    """Records every request and answers from routes: (method, path regex) → answer."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._routes: list[tuple[str, re.Pattern[str], Answer]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stand_in = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def on(self, method: str, path: str, status: int = 200, body: Any = None) -> None:
        self.answer(method, path, lambda _seen: (status, body))

    def answer(self, method: str, path: str, answer: Answer) -> None:
        self._routes.append((method, re.compile(path), answer))

    def respond(self, seen: Seen) -> tuple[int, Any]:
        self.requests.append(seen)
        for method, path, answer in self._routes:
            if method == seen.method and path.fullmatch(seen.path):
                return answer(seen)
        reason = f"no route for {seen.method} {seen.path}"
        return 400, {
            "error": {"type": "stand_in", "reason": reason, "root_cause": [{"reason": reason}]}
        }

    def only(self, method: str, path: str) -> Seen:
        (seen,) = [r for r in self.requests if r.method == method and r.path == path]
        return seen

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stand_in: StandIn


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, answer = self.server.stand_in.respond(
            Seen(self.command, url.path, parse_qs(url.query), body)
        )
        payload = b"" if answer is None or self.command == "HEAD" else json.dumps(answer).encode()
        self.send_response(status)
        # The client refuses a server that does not say it is Elasticsearch.
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Type", "application/vnd.elasticsearch+json;compatible-with=9")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads `StandIn.requests` instead."""


@pytest.fixture()
def es() -> Iterator[StandIn]:
    with StandIn() as stand_in:
        yield stand_in


def run(
    url: str, scenario: Callable[[ElasticsearchIndex], Awaitable[None]], **options: Any
) -> None:
    async def main() -> None:
        index = ElasticsearchIndex(url, prefix=PREFIX, **options)
        try:
            await scenario(index)
        finally:
            await index.close()

    asyncio.run(main())


def chunk(doc_id: str, metadata: dict[str, Any], position: int = 0) -> Chunk:
    return Chunk(f"{doc_id}#{position}", doc_id, f"Text of {doc_id}.", position,
                 title=doc_id.title(), url=f"https://x.test/{doc_id}", source="farm",
                 metadata=metadata)  # fmt: skip


def bulk_answer(rejections: dict[str, dict[str, Any]] | None = None) -> Answer:
    """A `_bulk` answer with one item per action line; `rejections` maps _id → error."""
    rejections = rejections or {}

    def answer(seen: Seen) -> tuple[int, Any]:
        items = []
        for action in seen.ndjson()[::2]:
            chunk_id = action["index"]["_id"]
            error = rejections.get(chunk_id)
            result = {"status": 400, "error": error} if error else {"status": 201}
            items.append(
                {"index": {"_index": action["index"]["_index"], "_id": chunk_id, **result}}
            )
        return 200, {"took": 1, "errors": bool(rejections), "items": items}

    return answer


def index_exists(es: StandIn, collection: str) -> None:
    es.on("HEAD", f"/{PREFIX}{collection}", 200)


# --- template and index creation ---------------------------------------------------------


def test_first_use_installs_the_template_then_creates_the_index_with_its_analyzer(
    es: StandIn,
) -> None:
    es.on("PUT", "/_index_template/t-template", body={"acknowledged": True})
    es.on("HEAD", "/t-docs_de", 404)
    es.on("PUT", "/t-docs_de", body={"acknowledged": True, "index": "t-docs_de"})
    es.on("HEAD", "/t-docs_en", 200)

    async def scenario(index: ElasticsearchIndex) -> None:
        await index.ensure_collection("docs_de")
        await index.ensure_collection("docs_de")  # known now: no second round trip
        await index.ensure_collection("docs_en")

    run(es.url, scenario, collection_analyzers={"docs_de": "german"})
    assert es.calls() == [
        ("PUT", "/_index_template/t-template"),
        ("HEAD", "/t-docs_de"),
        ("PUT", "/t-docs_de"),
        ("HEAD", "/t-docs_en"),
    ]
    template = es.only("PUT", "/_index_template/t-template").json()
    assert template["index_patterns"] == ["t-*"]
    settings, mappings = template["template"]["settings"], template["template"]["mappings"]
    assert settings["analysis"] == {"analyzer": {"ragline_text": {"type": "english"}}}
    assert mappings["properties"]["text"]["analyzer"] == "ragline_text"
    assert mappings["properties"]["title"]["analyzer"] == "ragline_text"
    assert mappings["date_detection"] is False
    rules = {name: rule for entry in mappings["dynamic_templates"] for name, rule in entry.items()}
    strict_double = {"type": "double", "coerce": False}
    assert rules == {
        "hidden_numbers": {"path_match": "metadata_numbers.*", "mapping": {"type": "double"}},
        "hidden_dates": {"path_match": "metadata_dates.*", "mapping": {"type": "double"}},
        "hidden_booleans": {"path_match": "metadata_booleans.*", "mapping": {"type": "boolean"}},
        "metadata_strings": {
            "path_match": "metadata.*",
            "match_mapping_type": "string",
            "mapping": {"type": "keyword", "ignore_above": 8191},
        },
        "metadata_integers": {
            "path_match": "metadata.*", "match_mapping_type": "long", "mapping": strict_double,
        },
        "metadata_floats": {
            "path_match": "metadata.*", "match_mapping_type": "double", "mapping": strict_double,
        },
        "metadata_booleans": {
            "path_match": "metadata.*", "match_mapping_type": "boolean",
            "mapping": {"type": "boolean"},
        },
    }  # fmt: skip
    # The collection's own analyzer replaces the template's default at creation.
    created = es.only("PUT", "/t-docs_de").json()
    assert created == {"settings": {"analysis": {"analyzer": {"ragline_text": {"type": "german"}}}}}


def test_an_unknown_analyzer_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="klingon"):
        ElasticsearchIndex("http://127.0.0.1:9", collection_analyzers={"c": "klingon"})


# --- writes ----------------------------------------------------------------------------


def test_upsert_sends_bulk_lines_with_the_hidden_maps_then_drops_stale_chunks(
    es: StandIn,
) -> None:
    index_exists(es, "c")
    es.answer("PUT", "/_bulk", bulk_answer())
    es.on("POST", "/t-c/_delete_by_query", body={"deleted": 2, "failures": []})
    apple = chunk("apple", {"year": 2020, "when": "2024-05-01T12:00:00+02:00", "ok": True})
    pear = chunk("pear", {"lang": "en", "score": 1.5, "when": "soon"})

    run(es.url, lambda index: index.upsert("c", [apple, pear]))
    bulk = es.only("PUT", "/_bulk")
    assert bulk.params["refresh"] == ["wait_for"]
    assert bulk.ndjson() == [
        {"index": {"_index": "t-c", "_id": "apple#0"}},
        {**apple.payload(), "metadata_numbers": {"year": 2020.0},
         "metadata_dates": {"when": MAY_1_10H}, "metadata_booleans": {"ok": True}},
        {"index": {"_index": "t-c", "_id": "pear#0"}},
        {**pear.payload(), "metadata_numbers": {"score": 1.5}, "metadata_dates": {},
         "metadata_booleans": {}},
    ]  # fmt: skip
    stale = es.only("POST", "/t-c/_delete_by_query")
    assert stale.params["refresh"] == ["true"]
    assert stale.json()["query"] == {
        "bool": {
            "filter": [{"terms": {"doc_id": ["apple", "pear"]}}],
            "must_not": [{"ids": {"values": ["apple#0", "pear#0"]}}],
        }
    }


def test_bulk_requests_are_chunked(es: StandIn) -> None:
    index_exists(es, "c")
    es.answer("PUT", "/_bulk", bulk_answer())
    es.on("POST", "/t-c/_delete_by_query", body={"deleted": 0, "failures": []})
    chunks = [chunk("big", {}, position) for position in range(501)]

    run(es.url, lambda index: index.upsert("c", chunks))
    bulks = [r for r in es.requests if r.path == "/_bulk"]
    assert [len(r.ndjson()) // 2 for r in bulks] == [500, 1]


def test_a_mapping_conflict_becomes_metadata_conflict(es: StandIn) -> None:
    index_exists(es, "c")
    reason = (
        "[1:160] failed to parse field [metadata.year] of type [double] in document with "
        "id 'pear#0'. Preview of field's value: 'MMXX'"
    )
    error = {
        "type": "document_parsing_exception",
        "reason": reason,
        "caused_by": {"type": "illegal_argument_exception", "reason": 'For input string: "MMXX"'},
    }
    es.answer("PUT", "/_bulk", bulk_answer({"pear#0": error}))
    es.on("POST", "/t-c/_delete_by_query", body={"deleted": 0, "failures": []})

    async def scenario(index: ElasticsearchIndex) -> None:
        apple, pear = chunk("apple", {"year": 2020}), chunk("pear", {"year": "MMXX"})
        with pytest.raises(MetadataConflict) as raised:
            await index.upsert("c", [apple, pear])
        conflict = raised.value
        assert isinstance(conflict, ValueError)
        assert (conflict.collection, conflict.key) == ("c", "year")
        message = str(conflict)
        assert "metadata key 'year' of collection 'c'" in message
        assert "document 'pear'" in message and reason in message and "MMXX" in message
        assert conflict.doc_ids == ["pear"]  # the journal removes only this one

    run(es.url, scenario)
    # The accepted document still loses its stale chunks; the rejected one keeps its old ones.
    stale = es.only("POST", "/t-c/_delete_by_query").json()
    assert stale["query"]["bool"]["filter"] == [{"terms": {"doc_id": ["apple"]}}]


def test_another_400_is_a_refusal_of_that_document(es: StandIn) -> None:
    """A 400 other than a mapping conflict is still the data's fault: final, not retried."""
    index_exists(es, "c")
    bad = {"type": "max_bytes_length_exceeded_exception", "reason": "a huge term"}
    es.answer("PUT", "/_bulk", bulk_answer({"pear#0": bad}))
    es.on("POST", "/t-c/_delete_by_query", body={"deleted": 0, "failures": []})

    async def scenario(index: ElasticsearchIndex) -> None:
        with pytest.raises(WriteRefused, match="huge term") as raised:
            await index.upsert("c", [chunk("apple", {}), chunk("pear", {})])
        assert not isinstance(raised.value, MetadataConflict)
        assert raised.value.doc_ids == ["pear"]

    run(es.url, scenario)


def test_other_bulk_rejections_are_backend_unavailable(es: StandIn) -> None:
    index_exists(es, "c")
    busy = {"type": "es_rejected_execution_exception", "reason": "queue is full"}

    def answer(seen: Seen) -> tuple[int, Any]:
        status, body = bulk_answer({"apple#0": busy})(seen)
        body["items"][0]["index"]["status"] = 429
        return status, body

    es.answer("PUT", "/_bulk", answer)

    async def scenario(index: ElasticsearchIndex) -> None:
        with pytest.raises(BackendUnavailable, match="queue is full"):
            await index.upsert("c", [chunk("apple", {})])

    run(es.url, scenario)
    assert ("POST", "/t-c/_delete_by_query") not in es.calls()  # retried later as a whole


# --- reads -----------------------------------------------------------------------------

APPLE = chunk("apple", {"year": 2020, "when": "2024-05-01"})


def search_answer(seen: Seen) -> tuple[int, Any]:
    hit = {"_index": "t-c", "_id": APPLE.chunk_id, "_score": 1.5, "_source": APPLE.payload()}
    return 200, {"took": 1, "timed_out": False, "hits": {"hits": [hit]}}


def strings(key: str, *values: str) -> dict[str, Any]:
    """The DSL of string values: lenient, and never where the key holds a number or bool."""
    return {
        "bool": {
            "should": [
                {"match": {f"metadata.{key}": {"query": v, "lenient": True}}} for v in values
            ],
            "minimum_should_match": 1,
            "must_not": [
                {"exists": {"field": f"metadata_numbers.{key}"}},
                {"exists": {"field": f"metadata_booleans.{key}"}},
            ],
        }
    }


def any_of(*alternatives: dict[str, Any]) -> dict[str, Any]:
    return {"bool": {"should": list(alternatives), "minimum_should_match": 1}}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"lang": "en"}, [any_of(strings("lang", "en"))]),
        ({"lang": ["en", "de"]}, [any_of(strings("lang", "en", "de"))]),
        ({"ok": True}, [any_of({"terms": {"metadata_booleans.ok": [True]}})]),
        ({"year": 2020}, [any_of({"terms": {"metadata_numbers.year": [2020.0]}})]),
        (
            {"year": [2020, 2021.5, "MMXX", False]},
            [any_of({"terms": {"metadata_numbers.year": [2020.0, 2021.5]}},
                    {"terms": {"metadata_booleans.year": [False]}}, strings("year", "MMXX"))],
        ),
        (
            {"year": {"gte": 2020, "lt": 2024.5}},
            [{"range": {"metadata_numbers.year": {"gte": 2020.0, "lt": 2024.5}}}],
        ),
        (
            {"when": {"gt": "2024-05-01", "lte": "2024-05-01T12:00:00+02:00"}},
            [{"range": {"metadata_dates.when": {"gt": MAY_1, "lte": MAY_1_10H}}}],
        ),
        (
            {"source": ["farm", "park"], "title": "Apple", "doc_id": "apple"},
            [{"terms": {"source": ["farm", "park"]}}, {"terms": {"title.raw": ["Apple"]}},
             {"terms": {"doc_id": ["apple"]}}],
        ),
    ],
)  # fmt: skip
def test_search_dsl_of_each_filter_kind(
    es: StandIn, filters: dict[str, Any], expected: list[dict[str, Any]]
) -> None:
    es.answer("POST", "/t-c/_search", search_answer)

    async def scenario(index: ElasticsearchIndex) -> None:
        hits = await index.search("c", "apples", 7, filters)
        assert [(h.chunk, h.score) for h in hits] == [(APPLE, 1.5)]

    run(es.url, scenario)
    sent = es.only("POST", "/t-c/_search")
    assert sent.json() == {
        "query": {
            "bool": {
                "must": [{"multi_match": {"query": "apples", "fields": ["text", "title"]}}],
                "filter": expected,
            }
        },
        "size": 7,
        "track_total_hits": False,
    }
    hidden = "metadata_numbers,metadata_dates,metadata_booleans"
    assert sent.params["_source_excludes"] == [hidden]


def test_document_ids_travel_as_json_values_never_as_query_syntax(es: StandIn) -> None:
    """An id that would be syntax in a query string (issue 20) is a JSON value in `terms`
    and `term` queries, which Elasticsearch compares as one exact keyword."""
    hostile = 'x" or doc_id != "\\ OR *:* AND doc_id:[* TO *] é\U0001f600 (a)/b?c#d'
    es.answer("POST", "/t-c/_search", search_answer)
    index_exists(es, "c")
    es.on("POST", "/t-c/_delete_by_query", body={"deleted": 1, "failures": []})

    async def scenario(index: ElasticsearchIndex) -> None:
        await index.search("c", "apples", 5, {"doc_id": [hostile, "apple"]})
        assert await index.delete_document("c", hostile) == 1

    run(es.url, scenario)
    search = es.only("POST", "/t-c/_search").json()
    assert search["query"]["bool"]["filter"] == [{"terms": {"doc_id": [hostile, "apple"]}}]
    assert es.only("POST", "/t-c/_delete_by_query").json() == {
        "query": {"term": {"doc_id": hostile}}
    }


def test_a_filter_that_cannot_match_sends_nothing(es: StandIn) -> None:
    async def scenario(index: ElasticsearchIndex) -> None:
        assert await index.search("c", "apples", 5, {"source": 5}) == []

    run(es.url, scenario)
    assert es.requests == []


def test_a_missing_index_is_collection_not_found(es: StandIn) -> None:
    missing = {
        "error": {"type": "index_not_found_exception", "reason": "no such index [t-nope]",
                  "root_cause": [{"type": "index_not_found_exception", "reason": "no such index"}]},
        "status": 404,
    }  # fmt: skip
    es.on("POST", "/t-nope/_search", 404, missing)

    async def scenario(index: ElasticsearchIndex) -> None:
        with pytest.raises(CollectionNotFound):
            await index.search("nope", "apples", 5)
        with pytest.raises(CollectionNotFound):
            await index.chunk_ids("nope")

    run(es.url, scenario)


def test_chunk_ids_scroll_ids_only(es: StandIn) -> None:
    shards = {"total": 1, "successful": 1, "skipped": 0, "failed": 0}
    pages = iter([[{"_id": "c#0"}], []])
    es.on("POST", "/t-c/_search", body={
        "_scroll_id": "s1", "_shards": shards, "hits": {"hits": [{"_id": "a#0"}, {"_id": "b#0"}]},
    })  # fmt: skip
    es.answer(
        "POST",
        "/_search/scroll",
        lambda _seen: (200, {"_scroll_id": "s1", "_shards": shards, "hits": {"hits": next(pages)}}),
    )
    es.on("DELETE", "/_search/scroll", body={"succeeded": True, "num_freed": 1})

    async def scenario(index: ElasticsearchIndex) -> None:
        assert await index.chunk_ids("c") == {"a#0", "b#0", "c#0"}

    run(es.url, scenario)
    first = es.only("POST", "/t-c/_search")
    assert first.json() == {"_source": False, "sort": "_doc", "size": 5000}
    assert first.params["scroll"] == ["5m"]
    assert es.only("DELETE", "/_search/scroll").json() == {"scroll_id": "s1"}


# --- no server ---------------------------------------------------------------------------


def test_an_unreachable_server_is_backend_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def scenario(index: ElasticsearchIndex) -> None:
        assert not await index.healthy()
        with pytest.raises(BackendUnavailable):
            await index.search("c", "apples", 5)
        with pytest.raises(BackendUnavailable):
            await index.ensure_collection("c")
        with pytest.raises(BackendUnavailable):
            await index.upsert("c", [chunk("apple", {})])

    run(url, scenario)
