"""Production lexical index: Elasticsearch (BM25) through `AsyncElasticsearch`.

One index per collection, `<prefix><collection>`. On first use the backend installs an
index template (`<prefix>template`, pattern `<prefix>*`) holding the mapping and the
default analysis, so an index made by hand or by a reindex gets the same mapping; it then
creates the collection's index with that collection's analyzer. `text` and `title` are
analysed by `ragline_text`, a built-in Elasticsearch analyzer: `english` by default
(standard tokenizer, English possessive stemmer, lowercase, English stop words, Porter
stemmer), or the one named for the collection (`german`, `standard`, ...).

Metadata is mapped dynamically, one type per key: strings → keyword, numbers → double
(so ints and floats mix), booleans → boolean, without coercion and without date detection.
A value of another type than its key's is rejected by Elasticsearch; `upsert` turns that
into `MetadataConflict`. Number and boolean equality and every range read the hidden
`metadata_numbers`/`metadata_booleans`/`metadata_dates` maps, so a range never compares
keyword strings. String equality is a lenient `match` on the key that excludes documents
holding a number or boolean there: Elasticsearch quietly stores 5 or true in a keyword
field and "true" in a boolean one, and a strict `term` of "abc" on a double field would
fail the whole search.

Writes use `refresh=wait_for`/`refresh=True` so that a read after an ingest or delete sees
it, which is what the contract suite (and the gateway) expect. Transport and API errors
become `BackendUnavailable`; a missing index becomes `CollectionNotFound`.

Indices created before the template existed keep their old mapping and have no hidden
maps: number and boolean equality and ranges do not work on them; re-ingest them into a
fresh collection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    BadRequestError,
    NotFoundError,
    TransportError,
)
from elasticsearch.helpers import async_bulk, async_scan

from ragline_common.wire import Filters
from ragline_retriever.backends.base import (
    BOOLEANS_FIELD,
    DATES_FIELD,
    HIDDEN_FIELDS,
    NUMBERS_FIELD,
    AnyOf,
    BackendUnavailable,
    Between,
    Chunk,
    CollectionNotFound,
    MetadataConflict,
    ScoredChunk,
    WriteRefused,
    filter_clauses,
    hidden_fields,
)

log = logging.getLogger("ragline.retriever.elasticsearch")

_FILTER_FIELD = {"doc_id": "doc_id", "source": "source", "title": "title.raw"}
_TEXT_ANALYZER = "ragline_text"
# Built-in analyzers a collection may use: the generic ones and the language analyzers.
ANALYZERS = frozenset(
    {"standard", "simple", "whitespace", "stop"}
    | {
        "arabic", "armenian", "basque", "bengali", "brazilian", "bulgarian", "catalan",
        "cjk", "czech", "danish", "dutch", "english", "estonian", "finnish", "french",
        "galician", "german", "greek", "hindi", "hungarian", "indonesian", "irish",
        "italian", "latvian", "lithuanian", "norwegian", "persian", "portuguese",
        "romanian", "russian", "serbian", "sorani", "spanish", "swedish", "thai", "turkish",
    }
)  # fmt: skip
_BULK_ACTIONS = 500
_BULK_BYTES = 10 * 1024 * 1024
_SCAN_PAGE = 5000
# Per-document bulk errors that mean "this value does not fit the key's mapping".
_CONFLICT_ERRORS = frozenset(
    {"document_parsing_exception", "mapper_parsing_exception", "illegal_argument_exception"}
)
_METADATA_KEY_IN_REASON = re.compile(r"\[metadata\.([A-Za-z0-9_]+)\]")


def analysis(analyzer: str) -> dict[str, Any]:
    """Index settings defining `ragline_text` as the named built-in analyzer.

    Only `type` is set, so a collection's settings replace the template's default whole
    (settings merge key by key: a custom chain would leak its filters into `german`).
    """
    return {"analysis": {"analyzer": {_TEXT_ANALYZER: {"type": analyzer}}}}


def mapping() -> dict[str, Any]:
    def dynamic(name: str, path: str, field: dict[str, Any], json_type: str = "") -> dict[str, Any]:
        rule: dict[str, Any] = {"path_match": path, "mapping": field}
        if json_type:
            rule["match_mapping_type"] = json_type
        return {name: rule}

    number = {"type": "double", "coerce": False}
    keyword = {"type": "keyword", "ignore_above": 8191}
    return {
        # "2024-05-01" stays a keyword; date ranges read the hidden epoch-seconds map.
        "date_detection": False,
        "numeric_detection": False,
        "dynamic_templates": [
            dynamic("hidden_numbers", f"{NUMBERS_FIELD}.*", {"type": "double"}),
            dynamic("hidden_dates", f"{DATES_FIELD}.*", {"type": "double"}),
            dynamic("hidden_booleans", f"{BOOLEANS_FIELD}.*", {"type": "boolean"}),
            # Longer strings are kept in _source but not indexed (a term has a byte limit).
            dynamic("metadata_strings", "metadata.*", keyword, "string"),
            dynamic("metadata_integers", "metadata.*", number, "long"),
            dynamic("metadata_floats", "metadata.*", number, "double"),
            dynamic("metadata_booleans", "metadata.*", {"type": "boolean"}, "boolean"),
        ],
        "properties": {
            "chunk_id": {"type": "keyword"},
            "doc_id": {"type": "keyword"},
            "text": {"type": "text", "analyzer": _TEXT_ANALYZER},
            "title": {
                "type": "text",
                "analyzer": _TEXT_ANALYZER,
                "fields": {"raw": {"type": "keyword", "ignore_above": 1024}},
            },
            "url": {"type": "keyword", "index": False},
            "source": {"type": "keyword"},
            "position": {"type": "integer"},
            "metadata": {"type": "object"},
            **{name: {"type": "object"} for name in HIDDEN_FIELDS},
        },
    }


def index_template(prefix: str, analyzer: str) -> dict[str, Any]:
    """The `put_index_template` body for every `<prefix>*` index.

    Priority grows with the prefix length: a longer prefix is more specific, and two
    templates whose patterns overlap must not share a priority (ES rejects that), e.g. a
    test prefix `ragline-test-x-` on the cluster that serves `ragline-`.
    """
    return {
        "index_patterns": [f"{prefix}*"],
        "priority": 100 + len(prefix),
        "template": {
            "settings": {"number_of_shards": 1, **analysis(analyzer)},
            "mappings": mapping(),
        },
        "meta": {"managed_by": "ragline"},
    }


@contextmanager
def _errors(collection: str | None) -> Iterator[None]:
    """Client errors as the exceptions the service handles; a 404 is a missing index
    when the call is about one collection."""
    try:
        yield
    except NotFoundError as exc:
        if collection is None:
            raise BackendUnavailable(f"elasticsearch: {exc}") from exc
        raise CollectionNotFound(collection) from exc
    except (ApiError, TransportError) as exc:
        raise BackendUnavailable(f"elasticsearch: {exc}") from exc


def _range(clause: Between) -> dict[str, Any]:
    bounds: dict[str, float] = {}
    if clause.lower is not None:
        bounds["gte" if clause.include_lower else "gt"] = clause.lower
    if clause.upper is not None:
        bounds["lte" if clause.include_upper else "lt"] = clause.upper
    return {"range": {f"{clause.hidden_field}.{clause.field}": bounds}}


def _strings(key: str, values: tuple[str, ...]) -> dict[str, Any]:
    """String equality: lenient, so "abc" against a double-mapped key matches nothing
    instead of failing with a 400; documents holding a number or boolean under the key are
    excluded, so "10" never equals 10 nor "true" true, whatever the key's mapping."""
    return {
        "bool": {
            "should": [
                {"match": {f"metadata.{key}": {"query": v, "lenient": True}}} for v in values
            ],
            "minimum_should_match": 1,
            "must_not": [
                {"exists": {"field": f"{NUMBERS_FIELD}.{key}"}},
                {"exists": {"field": f"{BOOLEANS_FIELD}.{key}"}},
            ],
        }
    }


def _any_of(clause: AnyOf) -> dict[str, Any] | None:
    if clause.on_document:
        if not clause.strings:
            return None
        return {"terms": {_FILTER_FIELD[clause.field]: list(clause.strings)}}
    key = clause.field
    alternatives: list[dict[str, Any]] = []
    if clause.numbers:
        alternatives.append({"terms": {f"{NUMBERS_FIELD}.{key}": list(clause.numbers)}})
    if clause.booleans:
        alternatives.append({"terms": {f"{BOOLEANS_FIELD}.{key}": list(clause.booleans)}})
    if clause.strings:
        alternatives.append(_strings(key, clause.strings))
    if not alternatives:
        return None
    return {"bool": {"should": alternatives, "minimum_should_match": 1}}


def filter_query(filters: Filters | None) -> list[dict[str, Any]] | None:
    """The `bool.filter` clauses for the filters; None when some filter can match nothing."""
    clauses = []
    for clause in filter_clauses(filters):
        query = _range(clause) if isinstance(clause, Between) else _any_of(clause)
        if query is None:
            return None
        clauses.append(query)
    return clauses


def _conflict(collection: str, doc_id: str, error: Mapping[str, Any]) -> MetadataConflict:
    reason = str(error.get("reason", error.get("type", "rejected")))
    cause = error.get("caused_by") or {}
    if cause.get("reason"):
        reason = f"{reason} ({cause['reason']})"
    found = _METADATA_KEY_IN_REASON.search(reason)
    return MetadataConflict(
        collection, found.group(1) if found else None, f"document {doc_id!r}: {reason}"
    )


class ElasticsearchIndex:
    name = "elasticsearch"

    def __init__(
        self,
        url: str,
        api_key: str = "",
        prefix: str = "ragline-",
        timeout: float = 10.0,
        analyzer: str = "english",
        collection_analyzers: Mapping[str, str] | None = None,
    ) -> None:
        unknown = {analyzer, *(collection_analyzers or {}).values()} - ANALYZERS
        if unknown:
            raise ValueError(
                f"unknown Elasticsearch analyzer(s) {sorted(unknown)}; "
                f"use one of {sorted(ANALYZERS)}"
            )
        self.prefix = prefix
        self.analyzer = analyzer
        self.collection_analyzers = dict(collection_analyzers or {})
        self._client = AsyncElasticsearch(
            url,
            api_key=api_key or None,
            request_timeout=timeout,
            max_retries=1,
            retry_on_timeout=False,
        )
        self._known: set[str] = set()
        self._template_installed = False

    def _index(self, collection: str) -> str:
        return f"{self.prefix}{collection}"

    async def open(self) -> None:
        """Nothing to open: the client connects lazily, so an ES outage does not block start.
        The template is installed on first use (`ensure_collection`)."""

    async def healthy(self) -> bool:
        try:
            return bool(await self._client.options(request_timeout=1.0).ping())
        except Exception:
            return False

    async def ensure_collection(self, collection: str) -> None:
        index = self._index(collection)
        if index in self._known:
            return
        with _errors(collection):
            if not self._template_installed:
                # Every start puts it again, so a new version's mapping reaches new indices.
                await self._client.indices.put_index_template(
                    name=f"{self.prefix}template", **index_template(self.prefix, self.analyzer)
                )
                self._template_installed = True
            if not await self._client.indices.exists(index=index):
                analyzer = self.collection_analyzers.get(collection, self.analyzer)
                try:
                    await self._client.indices.create(index=index, settings=analysis(analyzer))
                except BadRequestError as exc:
                    # Two replicas may race to create it; losing that race is fine.
                    if exc.error != "resource_already_exists_exception":
                        raise
        self._known.add(index)

    async def has_collection(self, collection: str) -> bool:
        index = self._index(collection)
        if index in self._known:
            return True
        with _errors(collection):
            exists = bool(await self._client.indices.exists(index=index))
        if exists:
            self._known.add(index)
        return exists

    async def upsert(self, collection: str, chunks: Sequence[Chunk]) -> None:
        """Bulk-index the chunks, then drop their documents' stale chunks.

        A chunk whose metadata does not fit the index's mapping is rejected alone; the
        rest of the batch is written, and `MetadataConflict` is raised at the end. Stale
        chunks of a rejected document are kept: its previous version stays searchable.
        """
        if not await self.has_collection(collection):
            raise CollectionNotFound(collection)
        index = self._index(collection)
        actions = [
            {
                "_op_type": "index",
                "_index": index,
                "_id": c.chunk_id,
                "_source": {**c.payload(), **hidden_fields(c.metadata)},
            }
            for c in chunks
        ]
        with _errors(collection):
            _, errors = await async_bulk(
                self._client,
                actions,
                chunk_size=_BULK_ACTIONS,
                max_chunk_bytes=_BULK_BYTES,
                refresh="wait_for",
                raise_on_error=False,
            )
        doc_of = {c.chunk_id: c.doc_id for c in chunks}
        rejected: dict[str, MetadataConflict] = {}
        for item in cast(list[dict[str, Any]], errors):
            (result,) = item.values()  # {"index": {"_id", "status", "error"}}
            error = result.get("error") or {}
            if result.get("status") != 400:
                # Not the data's fault (shard unavailable, queue full): retry the whole batch.
                raise BackendUnavailable(
                    f"elasticsearch did not index chunk {result.get('_id')!r}: {error}"
                )
            doc_id = doc_of.get(result.get("_id"), "?")
            if error.get("type") in _CONFLICT_ERRORS:
                rejected.setdefault(doc_id, _conflict(collection, doc_id, error))
            else:  # another 400: still the data's fault, so retrying cannot help
                reason = error.get("reason", error.get("type", "rejected"))
                rejected.setdefault(
                    doc_id, WriteRefused(f"elasticsearch refused document {doc_id!r}: {reason}")
                )
        doc_ids = [d for d in dict.fromkeys(doc_of.values()) if d not in rejected]
        if doc_ids:
            with _errors(collection):
                await self._client.delete_by_query(
                    index=index,
                    query={
                        "bool": {
                            "filter": [{"terms": {"doc_id": doc_ids}}],
                            "must_not": [{"ids": {"values": [c.chunk_id for c in chunks]}}],
                        }
                    },
                    refresh=True,
                    conflicts="proceed",
                )
        if rejected:
            conflicts = [r for r in rejected.values() if isinstance(r, MetadataConflict)]
            if conflicts:
                first = conflicts[0]
                raise MetadataConflict(collection, first.key, first.reason, list(rejected))
            raise WriteRefused(str(next(iter(rejected.values()))), list(rejected))

    async def delete_document(self, collection: str, doc_id: str) -> int:
        if not await self.has_collection(collection):
            raise CollectionNotFound(collection)
        with _errors(collection):
            result = await self._client.delete_by_query(
                index=self._index(collection),
                query={"term": {"doc_id": doc_id}},
                refresh=True,
                conflicts="proceed",
            )
        return int(result.get("deleted", 0))

    async def search(
        self, collection: str, query: str, limit: int, filters: Filters | None = None
    ) -> list[ScoredChunk]:
        clauses = filter_query(filters)
        if clauses is None:
            return []
        with _errors(collection):
            response = await self._client.search(
                index=self._index(collection),
                query={
                    "bool": {
                        "must": [{"multi_match": {"query": query, "fields": ["text", "title"]}}],
                        "filter": clauses,
                    }
                },
                size=limit,
                track_total_hits=False,
                source_excludes=list(HIDDEN_FIELDS),
            )
        return [
            ScoredChunk(Chunk.from_payload(hit["_source"]), float(hit["_score"] or 0.0))
            for hit in response["hits"]["hits"]
        ]

    async def list_collections(self) -> dict[str, int]:
        with _errors(None):
            try:
                indices = await self._client.indices.get(index=f"{self.prefix}*")
            except NotFoundError:  # a wildcard matching nothing: {} today, 404 on some setups
                return {}
            found = {}
            for index in sorted(indices):
                count = await self._client.count(index=index)
                found[index[len(self.prefix) :]] = int(count["count"])
        return found

    async def chunk_ids(self, collection: str) -> set[str]:
        """Scrolled in `_doc` order without `_source`: ids only, a page of 5000 at a time."""
        with _errors(collection):
            return {
                hit["_id"]
                async for hit in async_scan(
                    self._client,
                    index=self._index(collection),
                    query={"_source": False},
                    size=_SCAN_PAGE,
                )
            }

    async def close(self) -> None:
        await self._client.close()
