"""Dense index: Milvus through pymilvus `MilvusClient` (Milvus Lite on a file by default).

Milvus Lite is one process per data directory and its client is not meant for concurrent
use, so every call goes through one single-thread executor: calls are serialized and the
event loop never blocks. On Milvus Lite rows are flushed after each write (unflushed rows
are scanned in Python, ~15x slower to search); a server seals segments itself (a flush
costs it ~3 s, and frequent flushes leave it many tiny segments). On a server, searches
read at Bounded consistency, and at Strong for a while after this process wrote to the
collection (`_STRONG_READS_S`), so a search sees the ingest or delete before it. Filter
values (document ids among them) are written into the expression as string literals
escaped by `_literal`, because neither Milvus Lite nor Milvus 2.3 takes expression
templates (`filter_params`: "unexpected character '{'"); keys come from the validated
filter field pattern.

Milvus compares JSON values loosely (`metadata["k"] == 1` matches true, `>= 0` matches
false), so numbers, booleans and ranges read the hidden JSON fields (`metadata_numbers`,
`metadata_booleans`, `metadata_dates`), each holding one kind of value.

A collection is made in steps (create, vector index, `doc_id` index, load), any of which
can fail or be interrupted, so a collection is checked each time it is opened: a missing
index is created and the collection then loaded; a schema that does not fit (a field
missing or of another type, vectors of another dimension, an index of another metric,
say a collection made by an older ragline or for another embedding model) is refused
with `CollectionUnusable`, naming what is wrong. A collection is never used half-made.
The `doc_id` index follows the server's version (`scalar_index_type`): INVERTED on Milvus
2.4+ and Milvus Lite, Trie on 2.3, none on anything older or unrecognised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import DataNotMatchException, MilvusException, ParamError

from ragline_common.wire import Filters, MetadataValue
from ragline_retriever.backends.base import (
    BOOLEANS_FIELD,
    HIDDEN_FIELDS,
    NUMBERS_FIELD,
    AnyOf,
    BackendUnavailable,
    Between,
    Chunk,
    CollectionNotFound,
    ScoredChunk,
    WriteRefused,
    filter_clauses,
    hidden_fields,
)

log = logging.getLogger("ragline.retriever.milvus")


class _LiteUnimplemented(logging.Filter):
    """Milvus Lite serves pymilvus over an in-process gRPC server that lacks a few calls
    (AllocTimestamp, asked for while an index is built); pymilvus carries on without them,
    but grpc logs each refusal as an error with a traceback, so a healthy retriever's log
    showed errors. Only those refusals are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "Method not implemented" in str(exc))


logging.getLogger("grpc._server").addFilter(_LiteUnimplemented())
T = TypeVar("T")

# The hidden maps are never among them: they are for filtering only.
_OUTPUT_FIELDS = ["chunk_id", "doc_id", "text", "position", "title", "url", "source", "metadata"]
_ID_BATCH = 16_384  # the most one Milvus query may return
# A filter matching at most this many rows is scored exactly when HNSW comes back short.
_EXACT_ROWS = 4096
# VARCHAR limits in bytes; the chunker bounds chunk text well below the text limit.
_MAX_LEN = {
    "chunk_id": 512,
    "doc_id": 512,
    "text": 65535,
    "title": 4096,
    "url": 8192,
    "source": 4096,
}
# The schema this backend writes, but for the vector's dimension (the embedding model's).
_SCALAR_FIELDS: dict[str, DataType] = {
    "chunk_id": DataType.VARCHAR,
    "doc_id": DataType.VARCHAR,
    "text": DataType.VARCHAR,
    "title": DataType.VARCHAR,
    "url": DataType.VARCHAR,
    "source": DataType.VARCHAR,
    "position": DataType.INT64,
    "metadata": DataType.JSON,
    **dict.fromkeys(HIDDEN_FIELDS, DataType.JSON),
}
_METRIC = "COSINE"
# On a server, reads are Bounded (they see every write older than the server's
# common.gracefulTime, 5 s by default, whoever made it; ~2 ms) but Strong for this long
# after this process wrote to the collection: a Strong read waits for the newest write to
# be served (one proxy time tick, 200 ms by default), and pymilvus' Session level misses
# deletes on Milvus 2.3. So an ingest or delete is seen by the next search at once.
_STRONG_READS_S = 10.0
# (uri, collection) -> monotonic time of this process's last write to it (any MilvusIndex).
_WRITTEN: dict[tuple[str, str], float] = {}
_VECTOR_INDEX: dict[str, Any] = {
    "index_type": "HNSW",
    "metric_type": _METRIC,
    "params": {"M": 16, "efConstruction": 200},
}


class CollectionUnusable(BackendUnavailable):
    """A collection exists but does not fit this retriever (its schema or index): it is
    not used, and it stays so until an operator drops it. An outage to the write journal,
    so the writes that meet it wait instead of being lost."""


def scalar_index_type(version: str) -> str | None:
    """The index type for `doc_id` that a Milvus of `version` (as `get_server_version()`
    reports it) builds: INVERTED from 2.4 on and on Milvus Lite (`milvus_lite-3.2.2`),
    Trie on 2.3 (`v2.3.5`; it has no INVERTED), None (no index: filters on `doc_id` scan)
    on older or unrecognised versions."""
    if version.startswith("milvus_lite"):
        return "INVERTED"
    found = re.match(r"v?(\d+)\.(\d+)", version.strip())
    if not found:
        return None
    release = (int(found[1]), int(found[2]))
    if release >= (2, 4):
        return "INVERTED"
    if release == (2, 3):
        return "Trie"
    return None


# How a string literal's characters are written in an expression: a backslash and a
# double quote escaped (so no value can end the literal and go on as expression: an id
# `x" or doc_id != "` is one string), line breaks and tabs as \n \r \t (a raw line break
# ends a literal), every other character as it is. Both parsers take exactly these
# escapes: Milvus Lite refuses \u, \x and octal ones, so JSON's ensure_ascii form
# (`"\u00e9"`) made any accented value fail there (measured, Milvus Lite 3.2.2 and Milvus
# 2.3.5).
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _literal(value: MetadataValue) -> str:
    """A Milvus expression literal: a double-quoted string (`_STRING_ESCAPES`), or a
    number or boolean as JSON writes it."""
    if isinstance(value, str):
        return f'"{value.translate(_STRING_ESCAPES)}"'
    return json.dumps(value)


def _any_of(clause: AnyOf) -> str | None:
    if clause.on_document:
        if not clause.strings:
            return None
        return f"{clause.field} in [{', '.join(_literal(v) for v in clause.strings)}]"
    # `in` does not take a JSON path on the left in Milvus Lite: spell out the ORs.
    key = _literal(clause.field)
    alternatives = [
        *(f"metadata[{key}] == {_literal(v)}" for v in clause.strings),
        *(f"{NUMBERS_FIELD}[{key}] == {_literal(v)}" for v in clause.numbers),
        *(f"{BOOLEANS_FIELD}[{key}] == {_literal(v)}" for v in clause.booleans),
    ]
    return "(" + " or ".join(alternatives) + ")" if alternatives else None


def _between(clause: Between) -> str:
    ref = f"{clause.hidden_field}[{_literal(clause.field)}]"
    parts = []
    if clause.lower is not None:
        parts.append(f"{ref} {'>=' if clause.include_lower else '>'} {_literal(clause.lower)}")
    if clause.upper is not None:
        parts.append(f"{ref} {'<=' if clause.include_upper else '<'} {_literal(clause.upper)}")
    return "(" + " and ".join(parts) + ")"


def filter_expression(filters: Filters | None) -> str | None:
    """The boolean expression for the filters; None when some filter can match nothing."""
    clauses = []
    for clause in filter_clauses(filters):
        expression = _between(clause) if isinstance(clause, Between) else _any_of(clause)
        if expression is None:
            return None
        clauses.append(expression)
    return " and ".join(clauses)


def _cosines(matrix: np.ndarray, vector: Sequence[float]) -> list[float]:
    """Cosine similarity of each row of `matrix` and `vector` (0 for a zero vector)."""
    query = np.asarray(vector, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(query) or 1.0)
    return [float(s) for s in (matrix @ query) / np.where(norms == 0, 1.0, norms)]


class MilvusIndex:
    name = "milvus"

    def __init__(
        self, uri: str, dim: int, token: str = "", prefix: str = "ragline_", timeout: float = 30
    ) -> None:
        self.uri = uri
        self.dim = dim
        self.token = token
        self.prefix = prefix
        self.timeout = timeout
        self._client: MilvusClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus")
        self._loaded: set[str] = set()
        # What the server said at open (`get_server_version()`), and what follows from it.
        self.server_version = ""
        self.scalar_index: str | None = None
        self.lite = False

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @property
    def client(self) -> MilvusClient:
        """The open client; a server that was down at start is reconnected on next use.

        Only read from the executor thread, so the lazy open cannot race.
        """
        if self._client is None:
            try:
                self._open()
            except Exception as exc:
                raise BackendUnavailable(f"milvus is unreachable: {exc}") from exc
        assert self._client is not None
        return self._client

    def _physical(self, collection: str) -> str:
        return f"{self.prefix}{collection}"

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": self.timeout}
        if self.token:
            kwargs["token"] = self.token
        client = MilvusClient(**kwargs)
        self._loaded.clear()
        self._client = client
        try:
            self.server_version = str(client.get_server_version())
            self.lite = self.server_version.startswith("milvus_lite")
            self.scalar_index = scalar_index_type(self.server_version)
            log.log(
                logging.INFO if self.scalar_index else logging.WARNING,
                "milvus %s at %s: doc_id index %s",
                self.server_version,
                self.uri,
                self.scalar_index or "none (a version before 2.3, or one not recognised)",
            )
            for physical in client.list_collections():
                if physical.startswith(self.prefix):
                    try:
                        self._load(physical)
                    except BackendUnavailable as exc:
                        # One bad collection must not stop the service; using it says why.
                        log.warning("%s", exc)
        except Exception:
            self._client = None  # reconnect on next use
            raise

    def _schema_problems(self, physical: str) -> list[str]:
        """What in the collection's schema differs from what this backend writes."""
        fields = {f["name"]: f for f in self.client.describe_collection(physical)["fields"]}
        problems = []
        expected = {**_SCALAR_FIELDS, "vector": DataType.FLOAT_VECTOR}
        missing = [name for name in expected if name not in fields]
        if missing:
            problems.append(f"it lacks the field(s) {', '.join(missing)}")
        extra = [name for name in fields if name not in expected]
        if extra:
            problems.append(f"it has field(s) this retriever does not write: {', '.join(extra)}")
        for name, kind in expected.items():
            field = fields.get(name)
            if field is not None and field["type"] != kind:
                problems.append(f"{name} is {field['type'].name}, not {kind.name}")
        if "chunk_id" in fields and not fields["chunk_id"].get("is_primary"):
            problems.append("chunk_id is not its primary key")
        vector = fields.get("vector")
        if vector is not None and vector["type"] == DataType.FLOAT_VECTOR:
            dim = int(vector.get("params", {}).get("dim", 0))
            if dim != self.dim:
                problems.append(
                    f"its vectors have {dim} dimensions where the embedding model gives {self.dim}"
                )
        return problems

    def _indexes(self, physical: str) -> dict[str, dict[str, Any]]:
        """The collection's indexes by field name."""
        found = {}
        for name in self.client.list_indexes(physical):
            described = self.client.describe_index(physical, name)
            if described:
                found[str(described.get("field_name", name))] = described
        return found

    def _create_index(self, physical: str, field: str, wait: bool) -> None:
        """`wait`: until the index is built (pymilvus polls every 0.5 s); a new, empty
        collection has nothing to build."""
        params = self.client.prepare_index_params()
        if field == "vector":
            params.add_index(field_name="vector", **_VECTOR_INDEX)
        else:
            params.add_index(field_name=field, index_type=self.scalar_index)
        self.client.create_index(physical, params, sync=wait)

    def _load(self, physical: str, fresh: bool = False) -> None:
        """Check the collection, create the indexes it lacks, load it; or refuse it.
        `fresh`: just created, so the indexes are not a repair."""
        if physical in self._loaded:
            return
        try:
            problems = self._schema_problems(physical)
            indexes = self._indexes(physical) if not problems else {}
            metric = str(indexes.get("vector", {}).get("metric_type") or _METRIC).upper()
            if metric != _METRIC:
                problems.append(f"its vector index measures {metric}, not {_METRIC}")
            if problems:
                raise CollectionUnusable(
                    f"milvus collection {physical!r} does not fit this retriever: "
                    f"{'; '.join(problems)}. Drop it and ingest its documents again "
                    "(or point MILVUS_COLLECTION_PREFIX elsewhere)"
                )
            wanted = ["vector", *(["doc_id"] if self.scalar_index else [])]
            for field in [f for f in wanted if f not in indexes]:
                if not fresh:  # an interrupted creation, or a server that now has doc_id's
                    log.warning("milvus collection %r lacks its %s index", physical, field)
                self._create_index(physical, field, wait=not fresh)
            self.client.load_collection(physical)
        except MilvusException as exc:
            raise BackendUnavailable(f"milvus collection {physical!r}: {exc}") from exc
        self._loaded.add(physical)

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self._run(lambda: self.client.list_collections()), timeout=2)
        except Exception:
            return False
        return True

    async def ensure_collection(self, collection: str) -> None:
        await self._run(self._ensure, self._physical(collection))

    def _schema(self) -> Any:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(
            "chunk_id", DataType.VARCHAR, is_primary=True, max_length=_MAX_LEN["chunk_id"]
        )
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        for name, kind in _SCALAR_FIELDS.items():
            if name == "chunk_id":
                continue
            if kind == DataType.VARCHAR:
                schema.add_field(name, kind, max_length=_MAX_LEN[name])
            else:
                schema.add_field(name, kind)
        return schema

    def _ensure(self, physical: str) -> None:
        """Create the collection where it is missing, then check, repair and load it
        (`_load`). Each step is a call of its own, so a failure between two leaves a
        collection that the next call repairs."""
        if not self.client.has_collection(physical):
            self._loaded.discard(physical)  # dropped behind our back: made anew
            try:
                self.client.create_collection(
                    physical, schema=self._schema(), consistency_level="Strong"
                )
            except MilvusException as exc:
                raise BackendUnavailable(f"milvus collection {physical!r}: {exc}") from exc
            self._load(physical, fresh=True)
        else:
            self._load(physical)

    def _reads(self, physical: str) -> dict[str, Any]:
        """The consistency level of a search or query (see _STRONG_READS_S)."""
        if self.lite:
            return {}  # always current
        written = _WRITTEN.get((self.uri, physical))
        recent = written is not None and time.monotonic() - written < _STRONG_READS_S
        return {"consistency_level": "Strong" if recent else "Bounded"}

    def written_elsewhere(self, collection: str) -> None:
        """Another replica wrote to `collection` within the last few seconds (the shared
        write log says so): read it at Strong for a while too, or a search here could
        miss that write while the gateway already caches answers under its new version."""
        if not self.lite:
            _WRITTEN[(self.uri, self._physical(collection))] = time.monotonic()

    def _wrote(self, physical: str) -> None:
        if self.lite:
            self.client.flush(physical)
        else:
            _WRITTEN[(self.uri, physical)] = time.monotonic()

    def _require(self, collection: str) -> str:
        physical = self._physical(collection)
        if physical not in self._loaded:
            if not self.client.has_collection(physical):
                raise CollectionNotFound(collection)
            self._load(physical)
        return physical

    async def has_collection(self, collection: str) -> bool:
        try:
            await self._run(self._require, collection)
        except CollectionNotFound:
            return False
        return True

    async def upsert(
        self, collection: str, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]
    ) -> None:
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        await self._run(self._upsert, collection, list(chunks), [list(v) for v in vectors])

    def _upsert(self, collection: str, chunks: list[Chunk], vectors: list[list[float]]) -> None:
        physical = self._require(collection)
        rows = [
            {**c.payload(), **hidden_fields(c.metadata), "vector": v}
            for c, v in zip(chunks, vectors, strict=True)
        ]
        if rows:
            try:
                self.client.upsert(physical, rows)
            except (ParamError, DataNotMatchException) as exc:
                # The rows do not fit the schema (a field over its length): final.
                doc_ids = list(dict.fromkeys(c.doc_id for c in chunks))
                raise WriteRefused(f"milvus refused the rows: {exc}", doc_ids) from exc
        doc_ids = list(dict.fromkeys(c.doc_id for c in chunks))
        if doc_ids:
            # Stale chunks of these documents (an older, longer version) go after the new
            # rows are in, so a reader never finds the document missing.
            keep = ", ".join(_literal(c.chunk_id) for c in chunks)
            docs = ", ".join(_literal(d) for d in doc_ids)
            self.client.delete(physical, filter=f"doc_id in [{docs}] and chunk_id not in [{keep}]")
        self._wrote(physical)

    async def delete_document(self, collection: str, doc_id: str) -> int:
        return await self._run(self._delete, collection, doc_id)

    def _count(self, physical: str, expression: str) -> int:
        rows = self.client.query(
            physical, filter=expression, output_fields=["count(*)"], **self._reads(physical)
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def _delete(self, collection: str, doc_id: str) -> int:
        physical = self._require(collection)
        expression = f"doc_id == {_literal(doc_id)}"
        found = self._count(physical, expression)
        if found:
            self.client.delete(physical, filter=expression)
            self._wrote(physical)
        return found

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int,
        filters: Filters | None = None,
    ) -> list[ScoredChunk]:
        return await self._run(self._search, collection, list(vector), limit, filters)

    def _search(
        self, collection: str, vector: list[float], limit: int, filters: Filters | None
    ) -> list[ScoredChunk]:
        physical = self._require(collection)
        expression = filter_expression(filters)
        if expression is None:
            return []
        try:
            result = self.client.search(
                physical,
                data=[vector],
                filter=expression,
                limit=limit,
                output_fields=_OUTPUT_FIELDS,
                search_params={"metric_type": _METRIC, "params": {"ef": max(64, limit)}},
                **self._reads(physical),
            )
        except MilvusException as exc:
            raise BackendUnavailable(str(exc)) from exc
        hits = [
            ScoredChunk(Chunk.from_payload(hit["entity"]), float(hit["distance"]))
            for hit in result[0]
        ]
        if expression and len(hits) < limit:
            # Filtered HNSW search in Milvus Lite loses matches when the filter is very
            # selective (measured at 100k rows: `doc_id == X` found 0 of X's 2 chunks).
            # Fewer hits than asked for means the filter matches few rows: score those
            # exactly instead.
            exact = self._exact_search(physical, vector, limit, expression)
            if exact is not None:
                return exact
        return hits

    def _exact_search(
        self, physical: str, vector: list[float], limit: int, expression: str
    ) -> list[ScoredChunk] | None:
        """Cosine similarity against every row the filter matches; None past _EXACT_ROWS."""
        try:
            rows = self.client.query(
                physical,
                filter=expression,
                output_fields=[*_OUTPUT_FIELDS, "vector"],
                limit=_EXACT_ROWS + 1,
                **self._reads(physical),
            )
        except MilvusException as exc:
            raise BackendUnavailable(str(exc)) from exc
        if len(rows) > _EXACT_ROWS:
            return None
        if not rows:
            return []
        matrix = np.asarray([row["vector"] for row in rows], dtype=np.float32)
        scores = np.asarray(_cosines(matrix, vector))
        best = np.argsort(-scores, kind="stable")[:limit]
        return [ScoredChunk(Chunk.from_payload(rows[i]), float(scores[i])) for i in best]

    async def similarities(
        self, collection: str, vector: Sequence[float], chunk_ids: Sequence[str]
    ) -> dict[str, float]:
        if not chunk_ids:
            return {}
        return await self._run(self._similarities, collection, list(vector), list(chunk_ids))

    def _similarities(
        self, collection: str, vector: list[float], chunk_ids: list[str]
    ) -> dict[str, float]:
        """Cosine of `vector` and the stored vectors of `chunk_ids`: one primary-key query
        (about 1 ms for 50 ids on Milvus Lite), no search, nothing embedded."""
        physical = self._require(collection)
        wanted = list(dict.fromkeys(chunk_ids))
        try:
            rows = self.client.query(
                physical,
                filter=f"chunk_id in [{', '.join(_literal(c) for c in wanted)}]",
                output_fields=["chunk_id", "vector"],
                limit=len(wanted),
                **self._reads(physical),
            )
        except MilvusException as exc:
            raise BackendUnavailable(str(exc)) from exc
        if not rows:
            return {}
        matrix = np.asarray([row["vector"] for row in rows], dtype=np.float32)
        ids = [str(row["chunk_id"]) for row in rows]
        return dict(zip(ids, _cosines(matrix, vector), strict=True))

    async def list_collections(self) -> dict[str, int]:
        return await self._run(self._list)

    def _list(self) -> dict[str, int]:
        found = {}
        for physical in sorted(self.client.list_collections()):
            if physical.startswith(self.prefix):
                try:
                    self._load(physical)
                except BackendUnavailable:
                    continue  # stale: logged at open, explained on use
                found[physical[len(self.prefix) :]] = self._count(physical, "")
        return found

    async def chunk_ids(self, collection: str) -> set[str]:
        return await self._run(self._chunk_ids, collection)

    def _chunk_ids(self, collection: str) -> set[str]:
        """Paged by the query iterator, as a plain query stops at 16384 rows (~5 s for 100k
        chunks on Milvus Lite)."""
        iterator = self.client.query_iterator(
            self._require(collection), batch_size=_ID_BATCH, output_fields=["chunk_id"]
        )
        found: set[str] = set()
        try:
            while batch := iterator.next():
                found.update(row["chunk_id"] for row in batch)
        finally:
            iterator.close()
        return found

    async def close(self) -> None:
        if self._client is not None:
            await self._run(self._client.close)
            self._client = None
        self._executor.shutdown(wait=False)
