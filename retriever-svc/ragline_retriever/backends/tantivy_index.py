"""Embedded lexical index: tantivy (BM25), one index directory per collection.

The query string is never given to tantivy's query parser: it is analysed with the same
analyzer the `text` and `title` fields use and turned into term queries, so no user input
can cause a parse error or address another field (`doc_id:x`). Writes hold a per-collection
lock and run in a worker thread; the reader is reloaded after each commit so that a write
is visible to the next search.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tantivy

from ragline_common.wire import Filters, MetadataValue
from ragline_retriever.backends.base import (
    TOP_LEVEL_FILTER_FIELDS,
    Chunk,
    CollectionNotFound,
    ScoredChunk,
    filter_items,
)

log = logging.getLogger("ragline.retriever.tantivy")

_TEXT_TOKENIZER = "en_stem"
_WRITER_HEAP_BYTES = 32_000_000
# The field each top-level filter reads (title is analysed for search, so a raw copy).
_FILTER_FIELD = {"doc_id": "doc_id", "source": "source", "title": "title_raw"}


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
    builder.add_json_field("metadata", stored=True, tokenizer_name="raw")
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


def _typed_terms(value: MetadataValue) -> list[Any]:
    """Terms to match a metadata value; integral numbers match whether stored int or float."""
    if isinstance(value, bool) or isinstance(value, str):
        return [value]
    if isinstance(value, float) and value.is_integer():
        return [value, int(value)]
    if isinstance(value, int):
        return [value, float(value)]
    return [value]


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
                self._collections[path.name] = _Collection(path, self.schema)

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
        doc.add_json("metadata", dict(chunk.metadata))
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

    def _filter_query(self, filters: Filters | None) -> list[tantivy.Query] | None:
        """Must-clauses for the filters; None when some filter can match nothing."""
        clauses = []
        for name, values in filter_items(filters):
            if name in TOP_LEVEL_FILTER_FIELDS:
                field = _FILTER_FIELD[name]
                terms: list[Any] = [v for v in values if isinstance(v, str)]
            else:
                field = f"metadata.{name}"
                terms = [t for v in values for t in _typed_terms(v)]
            if not terms:
                return None
            alternatives = [
                (tantivy.Occur.Should, tantivy.Query.term_query(self.schema, field, t))
                for t in terms
            ]
            clauses.append(tantivy.Query.boolean_query(alternatives))
        return clauses

    def _search(
        self, collection: str, query: str, limit: int, filters: Filters | None
    ) -> list[ScoredChunk]:
        coll = self._get(collection)
        tokens = list(dict.fromkeys(_ANALYZER.analyze(query)))
        must = self._filter_query(filters)
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
                [(tantivy.Occur.Must, text_query)] + [(tantivy.Occur.Must, q) for q in must]
            )
        searcher = coll.index.searcher()
        hits = []
        for score, address in searcher.search(text_query, limit).hits:
            stored = searcher.doc(address).to_dict()
            payload = {key: values[0] for key, values in stored.items() if values}
            hits.append(ScoredChunk(Chunk.from_payload(payload), float(score)))
        return hits

    async def list_collections(self) -> dict[str, int]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> dict[str, int]:
        with self._registry_lock:
            items = list(self._collections.items())
        return {name: int(coll.index.searcher().num_docs) for name, coll in sorted(items)}

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        for coll in self._collections.values():
            coll.close()
