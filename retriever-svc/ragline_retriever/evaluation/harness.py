"""The evaluation run: ingest a BEIR corpus into a fresh embedded index, query every mode.

Everything goes through production code: `Runtime` opens the same backends the service
opens, `ingest.ingest` chunks and embeds exactly as `POST .../documents` does, and hybrid
is `search.retrieve`, i.e. the lexical and dense searches run concurrently and are fused
with the configured RRF settings. So a change to chunking, the model, a backend or the
fusion shows up here as it would in answers.

Timing: each mode runs over all queries one after the other, after a few untimed warm-up
queries, and each query is timed end to end (lexical: the search; dense: query embedding
plus search; hybrid: `retrieve`; hybrid+rerank: `retrieve` plus cross-encoder scoring of
the top 50). The query-embedding cache is off (`query_cache_size=0`), so no mode profits
from an embedding computed by an earlier one; production p50 on repeated questions is
lower than this.

Relevance is per corpus document: hits are chunks, so each hit list is mapped to
document ids and each document keeps its first (best) rank.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import Any, Protocol

from ragline_common.wire import MAX_DOCUMENTS_PER_BATCH, DocumentIn, Hit, RetrieveRequest
from ragline_retriever.evaluation.beir import BeirDataset, service_doc_ids
from ragline_retriever.evaluation.metrics import (
    first_occurrences,
    mean_metrics,
    percentile,
    query_metrics,
)
from ragline_retriever.fusion import reciprocal_rank_fusion
from ragline_retriever.ingest import ingest
from ragline_retriever.runtime import Runtime
from ragline_retriever.search import retrieve
from ragline_retriever.settings import RetrieverSettings

log = logging.getLogger("ragline.eval")

MODES = ("lexical", "dense", "hybrid", "hybrid+rerank")
# What the gateway asks the retriever for, and what it hands the reranker.
HYBRID_TOP_K = 50
RERANK_DEPTH = 50
WARMUP_QUERIES = 5

SWEEP_K = (1, 5, 10, 20, 40, 60, 100)
SWEEP_DEPTHS = (20, 50, 100)
SWEEP_WEIGHTS: tuple[tuple[float, float], ...] = ((1, 1), (1, 1.5), (1.5, 1), (1, 2), (2, 1))
SWEEP_METRICS = ("recall@20", "mrr@10", "ndcg@10")

NO_RERANKER = (
    "no cross-encoder given (--reranker-model PATH): no trained cross-encoder weights are "
    "available on this machine, and quality from random weights is never reported"
)


class PairScorer(Protocol):
    """What reranking needs of reranker-svc's scorers: (query, passage) pairs → scores."""

    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...


@dataclass
class ModeResult:
    """One mode's averages and latencies; `metrics` is None when the mode was not run."""

    metrics: dict[str, float] | None
    p50_ms: float | None = None
    p99_ms: float | None = None
    queries: int = 0
    # Queries answered with a backend dropped (hybrid modes): their numbers are degraded.
    degraded: int = 0
    note: str = ""


@dataclass(frozen=True)
class SweepRow:
    k: int
    depth: int
    weights: tuple[float, float]  # (lexical, dense)
    metrics: dict[str, float]
    # Queries whose nDCG@10 is higher / lower than with the current settings: a mean can
    # move on a handful of queries, and this says whether it did.
    better: int = 0
    worse: int = 0


@dataclass
class Sweep:
    rows: list[SweepRow]
    # Each backend alone, at the deepest depth, for the "at least the best single" check.
    single: dict[str, dict[str, float]]
    current: tuple[int, int, int, tuple[float, float]]  # k, lexical depth, dense depth, w


@dataclass
class EvalResult:
    dataset: str
    documents: int
    chunks: int
    queries: int
    modes: dict[str, ModeResult]
    settings: dict[str, Any]
    ingest_s: float
    sweep: Sweep | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvalOptions:
    collection: str = "eval"
    # Keep the index here instead of a temporary directory removed afterwards.
    keep: Path | None = None
    reranker: PairScorer | None = None
    reranker_note: str = NO_RERANKER
    sweep: bool = False
    # Settings fields to set on top of the environment (tests; a fusion experiment).
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup: int = WARMUP_QUERIES


def documents_for(dataset: BeirDataset, ids: Mapping[str, str]) -> list[DocumentIn]:
    """Corpus entries as the service ingests them: metadata-free, title from the corpus.

    A document with a title but no text is indexed by its title, since the service
    refuses empty text and the title is all there is to find it by.
    """
    return [
        DocumentIn(id=ids[doc.id], title=doc.title[:1000], text=doc.text.strip() or doc.title)
        for doc in dataset.corpus.values()
    ]


def _batches(items: Sequence[DocumentIn], size: int) -> list[Sequence[DocumentIn]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _timed(work: Awaitable[list[str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    ranked = await work
    return ranked, (time.perf_counter() - start) * 1000


def summarize(
    rankings: Sequence[Sequence[str]],
    qrels: Sequence[Mapping[str, int]],
    latencies_ms: Sequence[float],
    degraded: int = 0,
) -> ModeResult:
    per_query = [query_metrics(r, q) for r, q in zip(rankings, qrels, strict=True)]
    return ModeResult(
        metrics=mean_metrics(per_query),
        p50_ms=percentile(latencies_ms, 50),
        p99_ms=percentile(latencies_ms, 99),
        queries=len(per_query),
        degraded=degraded,
    )


def fuse_to_documents(
    lists: Mapping[str, Sequence[str]],
    chunk_doc: Mapping[str, str],
    k: int,
    weights: Mapping[str, float] | None = None,
) -> list[str]:
    """RRF over chunk-id lists (as `search.retrieve` fuses), then chunk → document."""
    fused = reciprocal_rank_fusion(lists, k=k, weights=weights)
    return first_occurrences(chunk_doc[f.key] for f in fused)


async def evaluate(dataset: BeirDataset, options: EvalOptions) -> EvalResult:
    """Ingest the corpus into a fresh index, run every mode, optionally sweep fusion."""
    if options.keep is not None:
        options.keep.mkdir(parents=True, exist_ok=True)
        if any(options.keep.iterdir()):
            raise ValueError(f"--keep {options.keep}: the directory must be empty or absent")
        return await _evaluate_in(dataset, options, options.keep)
    data_dir = Path(mkdtemp(prefix="ragline-eval-"))
    try:
        return await _evaluate_in(dataset, options, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _evaluate_in(dataset: BeirDataset, options: EvalOptions, data_dir: Path) -> EvalResult:
    settings = RetrieverSettings(
        **{
            **options.overrides,
            # The embedded backends on a fresh directory, whatever the environment says.
            "data_dir": data_dir,
            "lexical_backend": "tantivy",
            "dense_backend": "milvus",
            "milvus_uri": "",
            # No embedding cache: a mode must not reuse an embedding from an earlier mode.
            "query_cache_size": 0,
        }
    )
    rt = Runtime(settings)
    log.info("loading %s and opening the indexes in %s", settings.embedding_model, data_dir)
    await rt.open()
    try:
        dense = rt.dense
        if dense is None or not await dense.healthy() or not await rt.lexical.healthy():
            raise RuntimeError("an embedded index could not be opened (see the log above)")

        ids = service_doc_ids(list(dataset.corpus))
        back = {service_id: corpus_id for corpus_id, service_id in ids.items()}
        documents = documents_for(dataset, ids)
        start = time.perf_counter()
        chunks = done = 0
        for batch in _batches(documents, MAX_DOCUMENTS_PER_BATCH):
            response = await ingest(rt, options.collection, list(batch))
            chunks += response.chunks
            done += len(batch)
            log.info("ingested %d/%d documents", done, len(documents))
        ingest_s = time.perf_counter() - start
        log.info("ingested %d documents as %d chunks in %.1f s", len(documents), chunks, ingest_s)

        query_ids = list(dataset.queries)
        texts = [dataset.queries[q] for q in query_ids]
        qrels = [dataset.qrels[q] for q in query_ids]
        collection = options.collection
        lexical_depth = max(settings.lexical_candidates, HYBRID_TOP_K)
        dense_depth = max(settings.dense_candidates, HYBRID_TOP_K)
        degraded_counter = [0]

        def docs(doc_ids: Sequence[str]) -> list[str]:
            return first_occurrences(back[d] for d in doc_ids)

        async def lexical(query: str) -> list[str]:
            hits = await rt.lexical.search(collection, query, lexical_depth)
            return docs([h.chunk.doc_id for h in hits])

        async def dense_mode(query: str) -> list[str]:
            vector = await rt.embedder.embed_query(query)
            hits = await dense.search(collection, vector, dense_depth)
            return docs([h.chunk.doc_id for h in hits])

        async def hybrid_hits(query: str) -> list[Hit]:
            response = await retrieve(
                rt, RetrieveRequest(query=query, collection=collection, top_k=HYBRID_TOP_K)
            )
            if response.degraded:
                degraded_counter[0] += 1
            return list(response.hits)

        async def hybrid(query: str) -> list[str]:
            return docs([h.doc_id for h in await hybrid_hits(query)])

        async def hybrid_rerank(query: str) -> list[str]:
            assert options.reranker is not None
            hits = (await hybrid_hits(query))[:RERANK_DEPTH]
            if not hits:
                return []
            # The gateway sends the chunk text alone (pipeline._rerank); so does this.
            pairs = [(query, h.text) for h in hits]
            scores = await asyncio.to_thread(options.reranker.score, pairs)
            order = sorted(range(len(hits)), key=lambda i: -scores[i])  # stable on ties
            return docs([hits[i].doc_id for i in order])

        runners: dict[str, Callable[[str], Awaitable[list[str]]]] = {
            "lexical": lexical,
            "dense": dense_mode,
            "hybrid": hybrid,
        }
        if options.reranker is not None:
            runners["hybrid+rerank"] = hybrid_rerank

        modes: dict[str, ModeResult] = {}
        for mode, runner in runners.items():
            for query in texts[: options.warmup]:
                await runner(query)
            degraded_counter[0] = 0
            rankings: list[list[str]] = []
            latencies: list[float] = []
            for query in texts:
                ranked, ms = await _timed(runner(query))
                rankings.append(ranked)
                latencies.append(ms)
            modes[mode] = summarize(rankings, qrels, latencies, degraded_counter[0])
            log.info("%s: %d queries, p50 %.1f ms", mode, len(texts), modes[mode].p50_ms or 0.0)
        if "hybrid+rerank" not in modes:
            modes["hybrid+rerank"] = ModeResult(metrics=None, note=options.reranker_note)

        sweep = None
        if options.sweep:
            sweep = await _sweep(rt, collection, texts, qrels, back)

        return EvalResult(
            dataset=dataset.name,
            documents=len(documents),
            chunks=chunks,
            queries=len(texts),
            modes=modes,
            settings=_settings_summary(rt),
            ingest_s=ingest_s,
            sweep=sweep,
            warnings=list(dataset.warnings),
        )
    finally:
        await rt.close()


def _settings_summary(rt: Runtime) -> dict[str, Any]:
    s = rt.settings
    return {
        "embedding_model": s.embedding_model,
        "embedding_device": rt.embedder.device,
        "chunk_size": s.chunk_size,
        "chunk_overlap": s.chunk_overlap,
        "rrf_k": s.rrf_k,
        "lexical_candidates": s.lexical_candidates,
        "dense_candidates": s.dense_candidates,
        "rrf_weight_lexical": s.rrf_weight_lexical,
        "rrf_weight_dense": s.rrf_weight_dense,
        "query_cache_size": s.query_cache_size,
        "hybrid_top_k": HYBRID_TOP_K,
    }


async def _sweep(
    rt: Runtime,
    collection: str,
    texts: Sequence[str],
    qrels: Sequence[Mapping[str, int]],
    back: Mapping[str, str],
) -> Sweep:
    """Fusion settings compared offline on ranked lists fetched once at the deepest depth.

    Truncating a depth-100 list to 20 or 50 stands for a shallower search. That holds for
    BM25; the HNSW search widens its beam (ef) with the limit, so on a large corpus a
    shallower dense search can differ slightly. On squad-dev the row of the current
    settings reproduces the live hybrid numbers exactly.
    """
    deepest = max(SWEEP_DEPTHS)
    dense = rt.dense
    assert dense is not None  # checked when the run started
    log.info("sweep: fetching lexical and dense lists at depth %d", deepest)
    chunk_doc: dict[str, str] = {}
    lists: list[dict[str, list[str]]] = []
    for query in texts:
        lexical_hits = await rt.lexical.search(collection, query, deepest)
        vector = await rt.embedder.embed_query(query)
        dense_hits = await dense.search(collection, vector, deepest)
        for hit in (*lexical_hits, *dense_hits):
            chunk_doc[hit.chunk.chunk_id] = back[hit.chunk.doc_id]
        lists.append(
            {
                "lexical": [h.chunk.chunk_id for h in lexical_hits],
                "dense": [h.chunk.chunk_id for h in dense_hits],
            }
        )

    s = rt.settings
    current = (
        s.rrf_k,
        max(s.lexical_candidates, HYBRID_TOP_K),
        max(s.dense_candidates, HYBRID_TOP_K),
        (s.rrf_weight_lexical, s.rrf_weight_dense),
    )
    return sweep_lists(lists, chunk_doc, qrels, current)


def sweep_lists(
    lists: Sequence[Mapping[str, Sequence[str]]],
    chunk_doc: Mapping[str, str],
    qrels: Sequence[Mapping[str, int]],
    current: tuple[int, int, int, tuple[float, float]],
) -> Sweep:
    """The grid over per-query chunk-id lists (`{"lexical": [...], "dense": [...]}`)."""

    def rank(
        k: int, lexical_depth: int, dense_depth: int, w: tuple[float, float]
    ) -> list[dict[str, float]]:
        depths = {"lexical": lexical_depth, "dense": dense_depth}
        weights = {"lexical": w[0], "dense": w[1]}
        return [
            query_metrics(
                fuse_to_documents(
                    {role: ids[: depths[role]] for role, ids in per.items()}, chunk_doc, k, weights
                ),
                relevant,
            )
            for per, relevant in zip(lists, qrels, strict=True)
        ]

    def average(per_query: list[dict[str, float]]) -> dict[str, float]:
        means = mean_metrics(per_query)
        return {name: means[name] for name in SWEEP_METRICS}

    single = {
        role: average(
            [
                query_metrics(first_occurrences(chunk_doc[c] for c in per[role]), relevant)
                for per, relevant in zip(lists, qrels, strict=True)
            ]
        )
        for role in ("lexical", "dense")
    }
    baseline = [q["ndcg@10"] for q in rank(*current)]
    rows = []
    for depth in SWEEP_DEPTHS:
        for k in SWEEP_K:
            for weights in SWEEP_WEIGHTS:
                per_query = rank(k, depth, depth, weights)
                ndcg = [q["ndcg@10"] for q in per_query]
                rows.append(
                    SweepRow(
                        k,
                        depth,
                        weights,
                        average(per_query),
                        better=sum(a > b + 1e-12 for a, b in zip(ndcg, baseline, strict=True)),
                        worse=sum(a < b - 1e-12 for a, b in zip(ndcg, baseline, strict=True)),
                    )
                )
    return Sweep(rows=rows, single=single, current=current)


def load_reranker(model: str | None) -> tuple[PairScorer | None, str]:
    """reranker-svc's cross-encoder scorer for `model`, or None and why it is not used.

    `CrossEncoderScorer` refuses a checkpoint without a classification head. A checkpoint
    *with* a saved but untrained head passes that check, so the scorer must also rank a
    few unmistakable question/passage pairs correctly (`canary_failure`) before its
    numbers are reported.
    """
    if not model:
        return None, NO_RERANKER
    try:
        from ragline_reranker.scorers import CrossEncoderScorer, resolve_device
    except ImportError:
        return None, "reranker-svc (package ragline_reranker) is not installed"
    try:
        scorer = CrossEncoderScorer(model, device=resolve_device("auto"))
    except Exception as exc:  # UntrainedHeadError, a missing path, a broken checkpoint
        return None, f"{model!r} not used: {exc}"
    failure = canary_failure(scorer)
    if failure:
        return None, f"{model!r} not used: {failure}"
    return scorer, ""


# Unmistakable pairs: a trained reranker puts the answer first every time; a random head
# does so for all three with a chance of about (1/5)^3.
CANARY = (
    (
        "What is the boiling point of water at sea level?",
        "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
    ),
    (
        "Who invented basketball?",
        "Basketball was invented by James Naismith in 1891 in Springfield, Massachusetts.",
    ),
    (
        "How many lines does a sonnet have?",
        "A sonnet is a fourteen-line poem, usually written in iambic pentameter.",
    ),
)
CANARY_DISTRACTORS = (
    "The Great Wall of China stretches across northern China for thousands of kilometres.",
    "The stock market closed lower on Friday after a week of volatile trading.",
    "Photosynthesis lets plants turn sunlight, carbon dioxide and water into sugar.",
    "The Danube flows through ten countries before it reaches the Black Sea.",
)


def canary_failure(scorer: PairScorer) -> str:
    """Empty when the scorer ranks each canary answer above every distractor."""
    for question, answer in CANARY:
        scores = scorer.score([(question, answer), *((question, d) for d in CANARY_DISTRACTORS)])
        if not all(scores[0] > other for other in scores[1:]):
            return (
                f"it does not rank an obvious answer first ({question!r}); its head looks "
                "untrained, and quality from random weights is never reported"
            )
    return ""
