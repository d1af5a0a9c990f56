"""One contract for every index backend: the embedded ones always, the production ones
(Elasticsearch, a remote Milvus) wherever `RAGLINE_TEST_ES_URL` / `RAGLINE_TEST_MILVUS_URI`
name a server. Dense tests use small fixed vectors, so no model is loaded."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ragline_retriever.backends.base import Chunk, CollectionNotFound, DenseIndex, LexicalIndex

DIM = 4
# Each doc: (doc_id, text, source, metadata, vector)
DOCS: list[tuple[str, str, str, dict[str, Any], list[float]]] = [
    ("apple", "Apples grow on trees in orchards.", "farm",
     {"lang": "en", "year": 2020}, [1, 0, 0, 0]),
    ("banana", "Bananas grow in tropical plantations.", "farm",
     {"lang": "en", "year": 2021}, [0.9, 0.1, 0, 0]),
    ("cherry", "Cherry trees blossom in spring.", "park",
     {"lang": "de", "year": 2020}, [0.8, 0.2, 0.1, 0]),
    ("durian", "Durian fruit smells strongly.", "market",
     {"lang": "ms", "ok": True}, [0, 1, 0, 0]),
]  # fmt: skip


def chunk_of(doc_id: str, text: str, source: str, meta: dict[str, Any], pos: int = 0) -> Chunk:
    return Chunk(f"{doc_id}#{pos}", doc_id, text, pos, title=doc_id.title(),
                 url=f"https://x.test/{doc_id}", source=source, metadata=meta)  # fmt: skip


def corpus() -> tuple[list[Chunk], list[list[float]]]:
    chunks = [chunk_of(d, t, s, m) for d, t, s, m, _ in DOCS]
    return chunks, [list(map(float, v)) for *_, v in DOCS]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --- backends under test ----------------------------------------------------------------

Factory = Callable[[], Any]


def lexical_factory_for(kind: str, tmp_path: Path) -> Factory:
    if kind == "tantivy":
        from ragline_retriever.backends.tantivy_index import TantivyIndex

        return lambda: TantivyIndex(tmp_path / "tantivy")
    url = os.environ.get("RAGLINE_TEST_ES_URL")
    if not url:
        reason = "RAGLINE_TEST_ES_URL is not set: no Elasticsearch server to run the contract on"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from ragline_retriever.backends.elasticsearch_index import ElasticsearchIndex

    prefix = unique("ragline-test").replace("_", "-") + "-"
    return lambda: ElasticsearchIndex(url, prefix=prefix)


def dense_factory_for(kind: str, tmp_path: Path) -> Factory:
    from ragline_retriever.backends.milvus_index import MilvusIndex

    if kind == "milvus-lite":
        uri = str(tmp_path / "milvus.db")
        return lambda: MilvusIndex(uri, dim=DIM)
    uri = os.environ.get("RAGLINE_TEST_MILVUS_URI")
    if not uri:
        reason = "RAGLINE_TEST_MILVUS_URI is not set: no Milvus server to run the contract on"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    prefix = unique("ragline_test") + "_"
    return lambda: MilvusIndex(uri, dim=DIM, prefix=prefix)


LEXICAL_KINDS = ["tantivy", "elasticsearch"]
DENSE_KINDS = ["milvus-lite", "milvus-remote"]


@pytest.fixture(params=LEXICAL_KINDS)
def lexical_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return lexical_factory_for(request.param, tmp_path)


def run(factory: Factory, scenario: Callable[[Any], Awaitable[None]]) -> None:
    """Open a fresh index in a fresh event loop, run the scenario, always close."""

    async def main() -> None:
        index = factory()
        await index.open()
        try:
            await scenario(index)
        finally:
            await index.close()

    asyncio.run(main())


# --- one adapter so both roles run the same scenarios ----------------------------------


class Role:
    """Drives a lexical or a dense index through the same calls."""

    def __init__(self, index: Any, dense: bool) -> None:
        self.index = index
        self.dense = dense

    async def upsert(self, collection: str, chunks: list[Chunk], vectors: list[list[float]]):
        if self.dense:
            await self.index.upsert(collection, chunks, vectors)
        else:
            await self.index.upsert(collection, chunks)

    async def search(self, collection: str, filters: dict | None = None, limit: int = 10):
        if self.dense:
            hits = await self.index.search(collection, [1.0, 0.05, 0.0, 0.0], limit, filters)
        else:
            # Matches every corpus text: each one mentions grow/trees/fruit/smells.
            query = "grow trees blossom fruit smells"
            hits = await self.index.search(collection, query, limit, filters)
        return hits

    async def ids(self, collection: str, filters: dict | None = None) -> set[str]:
        return {h.chunk.doc_id for h in await self.search(collection, filters)}


BACKENDS = [f"lexical:{k}" for k in LEXICAL_KINDS] + [f"dense:{k}" for k in DENSE_KINDS]


@pytest.fixture(params=BACKENDS)
def role_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., None]:
    """Runs a scenario against one backend; every call opens it afresh on the same data."""
    role, kind = request.param.split(":")
    factory = (lexical_factory_for if role == "lexical" else dense_factory_for)(kind, tmp_path)

    def make(scenario: Callable[[Role], Awaitable[None]]) -> None:
        run(factory, lambda index: scenario(Role(index, role == "dense")))

    return make


def test_protocols_are_implemented(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        assert isinstance(role.index, DenseIndex if role.dense else LexicalIndex)
        assert await role.index.healthy()

    role_factory(scenario)


def test_same_docs_in_same_ids_and_payload_out(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        name = unique("c")
        await role.index.ensure_collection(name)
        assert await role.index.has_collection(name)
        chunks, vectors = corpus()
        await role.upsert(name, chunks, vectors)
        hits = await role.search(name)
        assert {h.chunk.chunk_id for h in hits} == {c.chunk_id for c in chunks}
        by_id = {h.chunk.chunk_id: h.chunk for h in hits}
        for chunk in chunks:
            assert by_id[chunk.chunk_id] == chunk  # every field round-trips
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)

    role_factory(scenario)


def test_upsert_is_idempotent_and_replaces_a_document(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        name = unique("c")
        await role.index.ensure_collection(name)
        chunks, vectors = corpus()
        await role.upsert(name, chunks, vectors)
        await role.upsert(name, chunks, vectors)
        assert (await role.index.list_collections())[name] == len(chunks)
        # A longer version of "apple" (3 chunks), then a shorter one (1): no orphans.
        longer = [chunk_of("apple", f"Apples grow part {i}.", "farm", {}, i) for i in range(3)]
        await role.upsert(name, longer, [[1.0, 0, 0, 0]] * 3)
        assert (await role.index.list_collections())[name] == len(chunks) + 2
        shorter = [chunk_of("apple", "Apples grow, version two.", "farm", {"v": 2})]
        await role.upsert(name, shorter, [[1.0, 0, 0, 0]])
        assert (await role.index.list_collections())[name] == len(chunks)
        apple = [h.chunk for h in await role.search(name) if h.chunk.doc_id == "apple"]
        assert [c.text for c in apple] == ["Apples grow, version two."]

    role_factory(scenario)


def test_delete_by_doc_id(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        name = unique("c")
        await role.index.ensure_collection(name)
        chunks, vectors = corpus()
        await role.upsert(name, chunks, vectors)
        assert await role.index.delete_document(name, "banana") == 1
        assert await role.index.delete_document(name, "banana") == 0
        assert await role.index.delete_document(name, "never-there") == 0
        assert "banana" not in await role.ids(name)
        assert await role.ids(name) == {"apple", "cherry", "durian"}

    role_factory(scenario)


def test_filters_equality_and_membership(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        name = unique("c")
        await role.index.ensure_collection(name)
        chunks, vectors = corpus()
        await role.upsert(name, chunks, vectors)
        assert await role.ids(name, {"source": "farm"}) == {"apple", "banana"}
        assert await role.ids(name, {"source": ["park", "market"]}) == {"cherry", "durian"}
        assert await role.ids(name, {"doc_id": ["apple", "durian"]}) == {"apple", "durian"}
        assert await role.ids(name, {"title": "Cherry"}) == {"cherry"}
        assert await role.ids(name, {"lang": "en"}) == {"apple", "banana"}
        assert await role.ids(name, {"year": 2020}) == {"apple", "cherry"}
        assert await role.ids(name, {"year": [2021, 1999]}) == {"banana"}
        assert await role.ids(name, {"ok": True}) == {"durian"}
        assert await role.ids(name, {"lang": "en", "year": 2020}) == {"apple"}
        assert await role.ids(name, {"missing_key": "x"}) == set()
        assert await role.ids(name, {"source": 5}) == set()
        assert await role.ids(name, {"lang": 'q"u\\ote'}) == set()  # escaping is safe

    role_factory(scenario)


def test_collections_are_isolated_and_unknown_ones_raise(role_factory: Any) -> None:
    async def scenario(role: Role) -> None:
        first, second = unique("a"), unique("b")
        for name in (first, second):
            await role.index.ensure_collection(name)
        chunks, vectors = corpus()
        await role.upsert(first, chunks, vectors)
        await role.upsert(second, chunks[:1], vectors[:1])
        assert await role.ids(first) == {"apple", "banana", "cherry", "durian"}
        assert await role.ids(second) == {"apple"}
        counts = await role.index.list_collections()
        assert counts[first] == 4 and counts[second] == 1
        missing = unique("missing")
        assert not await role.index.has_collection(missing)
        with pytest.raises(CollectionNotFound):
            await role.search(missing)
        with pytest.raises(CollectionNotFound):
            await role.index.delete_document(missing, "apple")
        assert missing not in await role.index.list_collections()

    role_factory(scenario)


def test_data_survives_reopening(role_factory: Any) -> None:
    name = unique("c")

    async def write(role: Role) -> None:
        await role.index.ensure_collection(name)
        chunks, vectors = corpus()
        await role.upsert(name, chunks, vectors)

    async def read(role: Role) -> None:
        assert await role.index.has_collection(name)
        assert await role.ids(name) == {"apple", "banana", "cherry", "durian"}

    role_factory(write)
    role_factory(read)


def test_lexical_query_text_never_breaks_the_parser(lexical_factory: Factory) -> None:
    async def scenario(index: Any) -> None:
        name = unique("c")
        await index.ensure_collection(name)
        chunks, _ = corpus()
        await index.upsert(name, chunks)
        for query in ['AND OR (( "unterminated', "doc_id:apple", "***", "title:[a TO", "+-!"]:
            hits = await index.search(name, query, 10)
            assert all(h.chunk.doc_id != "apple" for h in hits) or "apple" in query
        stemmed = await index.search(name, "blossoming cherries", 10)
        assert stemmed and stemmed[0].chunk.doc_id == "cherry"

    run(lexical_factory, scenario)
