"""Embedded lexical index: tantivy (BM25), one index directory per collection.

The query string is never given to tantivy's query parser: it is analysed with the same
analyzer the `text` and `title` fields use and turned into term queries, so no user input
can cause a parse error or address another field (`doc_id:x`). Writes hold a per-collection
lock and run in a worker thread; the reader is reloaded after each commit so that a write
is visible to the next search.

Metadata is stored as JSON bytes and its strings are filtered through a raw
`metadata_terms` field (`lang=en`), not through a JSON field: tantivy's JSON fields index a
string that looks like an RFC 3339 date as a date and hand it back as a `datetime`, so such
a value would neither round-trip nor match equality as a string. Numbers, dates and
booleans are filtered through the hidden maps (JSON fields holding no strings).

Ranges: tantivy 0.27's `Query.range_query` does not take a JSON path, and the query parser
supports ranges on JSON keys only in fast fields. So the hidden numbers and dates maps are
fast JSON fields and a range is parsed text, `metadata_numbers.year:[2020 TO *]`, built only
from a validated key and floats we format ourselves, never from user text. Each bound is a
clause of its own: the parser types `10` as an integer and `10.5` as a float, and a range
with one of each panics inside tantivy (`[10 TO 10.5]`); one-sided ranges compare right.

An index directory written before this layout has another schema; tantivy refuses
to open it with this one, so that collection raises `BackendUnavailable` with the fix
(delete the directory, re-ingest) while every other collection keeps working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import tantivy

from ragline_common.wire import FILTER_FIELD_PATTERN, Filters
from ragline_retriever.backends.base import (
    BOOLEANS_FIELD,
    DATES_FIELD,
    NUMBERS_FIELD,
    AnyOf,
    BackendUnavailable,
    Between,
    Chunk,
    CollectionNotFound,
    ScoredChunk,
    filter_clauses,
    hidden_fields,
)

log = logging.getLogger("ragline.retriever.tantivy")

_TEXT_TOKENIZER = "en_stem"
_WRITER_HEAP_BYTES = 32_000_000
# The field each top-level filter reads (title is analysed for search, so a raw copy).
_FILTER_FIELD = {"doc_id": "doc_id", "source": "source", "title": "title_raw"}
_SAFE_KEY = re.compile(FILTER_FIELD_PATTERN)


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("chunk_id", stored=True, tokenizer_name="raw")
    builder.add_text_field("doc_id", stored=True, tokenizer_name="raw")
    builder.add_text_field("text", stored=True, tokenizer_name=_TEXT_TOKENIZER)
    builder.add_text_field("title", stored=True, tokenizer_name=_TEXT_TOKENIZER)
    builder.add_text_field("title_raw", tokenizer_name="raw")
    builder.add_text_field("url", stored=True, tokenizer_name="raw")
    builder.add_text_field("source", stored=True, tokenizer_name="raw")
    builder.add_integer_field("position", stored=True, indexed=True)
    builder.add_bytes_field("metadata", stored=True, indexed=False)
    # Not stored: they exist to be filtered on, never to be returned.
    builder.add_text_field("metadata_terms", tokenizer_name="raw")
    builder.add_json_field(NUMBERS_FIELD, fast=True, tokenizer_name="raw")
    builder.add_json_field(DATES_FIELD, fast=True, tokenizer_name="raw")
    builder.add_json_field(BOOLEANS_FIELD, tokenizer_name="raw")
    return builder.build()


# tantivy's built-in en_stem, rebuilt so query text is analysed exactly like the fields.
_ANALYZER = (
    tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    .filter(tantivy.Filter.remove_long(40))
    .filter(tantivy.Filter.lowercase())
    .filter(tantivy.Filter.stemmer("english"))
    .build()
)


class _Collection:
    def __init__(self, path: Path, schema: tantivy.Schema) -> None:
        self.path = path
        self.schema = schema
        if tantivy.Index.exists(str(path)) and tantivy.Index.open(str(path)).schema != schema:
            raise BackendUnavailable(
                f"tantivy collection {path.name!r} was written by an older ragline (its "
                f"schema predates typed metadata filters): delete {path} and ingest it again"
            )
        self.index = tantivy.Index(schema, path=str(path), reuse=True)
        self.lock = threading.Lock()
        self._writer: Any = None

    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self.index.writer(heap_size=_WRITER_HEAP_BYTES, num_threads=1)
        return self._writer

    def count(self, field: str, value: str) -> int:
        query = tantivy.Query.term_query(self.schema, field, value)
        return int(self.index.searcher().search(query, 1, count=True).count or 0)

    def commit(self) -> None:
        self.writer().commit()
        self.index.reload()

    def close(self) -> None:
        with self.lock:
            if self._writer is not None:
                self._writer.wait_merging_threads()
                self._writer = None


def _metadata_term(key: str, value: str) -> str:
    """The `metadata_terms` term of a string value (keys cannot contain `=`)."""
    return f"{key}={value}"


def _number_text(value: float) -> str:
    """A float as the query parser reads it: positional (`1e-07` is a syntax error there)."""
    return format(Decimal(repr(value)), "f")


def _range_texts(clause: Between) -> list[str]:
    """One query-parser range per bound (see the module docstring)."""
    if not _SAFE_KEY.fullmatch(clause.field):  # validated upstream; the parser must not see more
        raise ValueError(f"invalid filter field {clause.field!r}")
    field = f"{clause.hidden_field}.{clause.field}"
    texts = []
    if clause.lower is not None:
        bracket = "[" if clause.include_lower else "{"
        texts.append(f"{field}:{bracket}{_number_text(clause.lower)} TO *]")
    if clause.upper is not None:
        bracket = "]" if clause.include_upper else "}"
        texts.append(f"{field}:[* TO {_number_text(clause.upper)}{bracket}")
    return texts


class TantivyIndex:
    name = "tantivy"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.schema = _schema()
        self._collections: dict[str, _Collection] = {}
        self._registry_lock = threading.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and tantivy.Index.exists(str(path)):
                try:
                    self._collections[path.name] = _Collection(path, self.schema)
                except BackendUnavailable as exc:
                    # One stale collection must not stop the service; using it says why.
                    log.warning("%s", exc)

    async def healthy(self) -> bool:
        return self.root.is_dir()

    def _get(self, collection: str, create: bool = False) -> _Collection:
        with self._registry_lock:
            found = self._collections.get(collection)
            if found is not None:
                return found
            path = self.root / collection
            if not create and not (path.is_dir() and tantivy.Index.exists(str(path))):
                raise CollectionNotFound(collection)
            path.mkdir(parents=True, exist_ok=True)
            found = _Collection(path, self.schema)
            self._collections[collection] = found
            return found

    async def ensure_collection(self, collection: str) -> None:
        await asyncio.to_thread(self._get, collection, True)

    async def has_collection(self, collection: str) -> bool:
        try:
            await asyncio.to_thread(self._get, collection)
        except CollectionNotFound:
            return False
        return True

    async def upsert(self, collection: str, chunks: Sequence[Chunk]) -> None:
        await asyncio.to_thread(self._upsert, collection, list(chunks))

    def _upsert(self, collection: str, chunks: list[Chunk]) -> None:
        coll = self._get(collection)
        with coll.lock:
            writer = coll.writer()
            # Deletes and adds land in one commit: readers never see a half-replaced doc.
            for doc_id in dict.fromkeys(c.doc_id for c in chunks):
                writer.delete_documents_by_term("doc_id", doc_id)
            for chunk in chunks:
                writer.add_document(self._document(chunk))
            coll.commit()

    @staticmethod
    def _document(chunk: Chunk) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_text("chunk_id", chunk.chunk_id)
        doc.add_text("doc_id", chunk.doc_id)
        doc.add_text("text", chunk.text)
        doc.add_text("title", chunk.title)
        doc.add_text("title_raw", chunk.title)
        doc.add_text("url", chunk.url)
        doc.add_text("source", chunk.source)
        doc.add_integer("position", chunk.position)
        doc.add_bytes("metadata", json.dumps(chunk.metadata).encode())
        for key, value in chunk.metadata.items():
            if isinstance(value, str):
                doc.add_text("metadata_terms", _metadata_term(key, value))
        for name, values in hidden_fields(chunk.metadata).items():
            doc.add_json(name, values)
        return doc

    async def delete_document(self, collection: str, doc_id: str) -> int:
        return await asyncio.to_thread(self._delete, collection, doc_id)

    def _delete(self, collection: str, doc_id: str) -> int:
        coll = self._get(collection)
        with coll.lock:
            found = coll.count("doc_id", doc_id)
            if found:
                coll.writer().delete_documents_by_term("doc_id", doc_id)
                coll.commit()
            return found

    async def search(
        self, collection: str, query: str, limit: int, filters: Filters | None = None
    ) -> list[ScoredChunk]:
        return await asyncio.to_thread(self._search, collection, query, limit, filters)

    def _filter_query(
        self, index: tantivy.Index, filters: Filters | None
    ) -> list[tantivy.Query] | None:
        """Must-clauses for the filters, scoring 0 so that filters never reorder hits;
        None when some filter can match nothing."""
        must = []
        for clause in filter_clauses(filters):
            if isinstance(clause, Between):
                query = tantivy.Query.boolean_query(
                    [(tantivy.Occur.Must, index.parse_query(t)) for t in _range_texts(clause)]
                )
            else:
                terms = self._terms(clause)
                if not terms:
                    return None
                query = tantivy.Query.boolean_query(
                    [
                        (tantivy.Occur.Should, tantivy.Query.term_query(self.schema, f, v))
                        for f, v in terms
                    ]
                )
            must.append(tantivy.Query.const_score_query(query, 0.0))
        return must

    @staticmethod
    def _terms(clause: AnyOf) -> list[tuple[str, Any]]:
        """(field, value) terms of a clause; a JSON path's term is typed by its Python type."""
        if clause.on_document:
            return [(_FILTER_FIELD[clause.field], s) for s in clause.strings]
        key = clause.field
        return [
            *(("metadata_terms", _metadata_term(key, v)) for v in clause.strings),
            *((f"{NUMBERS_FIELD}.{key}", v) for v in clause.numbers),
            *((f"{BOOLEANS_FIELD}.{key}", v) for v in clause.booleans),
        ]

    def _search(
        self, collection: str, query: str, limit: int, filters: Filters | None
    ) -> list[ScoredChunk]:
        coll = self._get(collection)
        tokens = list(dict.fromkeys(_ANALYZER.analyze(query)))
        must = self._filter_query(coll.index, filters)
        if not tokens or must is None:
            return []
        should = [
            (tantivy.Occur.Should, tantivy.Query.term_query(self.schema, field, token))
            for token in tokens
            for field in ("text", "title")
        ]
        text_query = tantivy.Query.boolean_query(should)
        if must:
            text_query = tantivy.Query.boolean_query(
                [(tantivy.Occur.Must, q) for q in (text_query, *must)]
            )
        searcher = coll.index.searcher()
        hits = []
        for score, address in searcher.search(text_query, limit).hits:
            stored = searcher.doc(address).to_dict()
            payload = {key: values[0] for key, values in stored.items() if values}
            payload["metadata"] = json.loads(payload.get("metadata") or b"{}")
            hits.append(ScoredChunk(Chunk.from_payload(payload), float(score)))
        return hits

    async def list_collections(self) -> dict[str, int]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> dict[str, int]:
        with self._registry_lock:
            items = list(self._collections.items())
        return {name: int(coll.index.searcher().num_docs) for name, coll in sorted(items)}

    async def chunk_ids(self, collection: str) -> set[str]:
        return await asyncio.to_thread(self._chunk_ids, collection)

    def _chunk_ids(self, collection: str) -> set[str]:
        """Read from the term dictionary, not the stored documents (~0.1 s for 100k
        chunks); the filter query drops the terms of deleted, not yet merged chunks."""
        searcher = self._get(collection).index.searcher()
        terms = searcher.terms_with_prefix(
            "chunk_id", "", filter_query=tantivy.Query.all_query(), limit=None
        )
        return {term for term, _count in terms}

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        for coll in self._collections.values():
            coll.close()
