"""Source ranking without a cross-encoder, and the relevance cut-off, measured on squad-dev.

Ingests a BEIR data set (default: ../shared/data/squad-dev, 473 questions) into a fresh
embedded index through the retriever's own code, asks every question once as the gateway
does (`retrieve`, top 50), and ranks the same 50 candidates every way:

- `fused`: the retriever's RRF order (what the gateway falls back to);
- `cosine`: the cosine of the query and each chunk's stored vector (`Hit.scores["dense"]`);
- `fused+cosine`: RRF score over the top one, plus the cosine;
- `blend w=…`: the gateway's `blend` (ranking.py), w * BM25 / top BM25 + (1 - w) * cosine;
- `bi-encoder` (with `--bi-encoder`): reranker-svc's fallback scorer, which embeds every
  candidate again: what the gateway's reranker call did before `blend`.

Per ranking: R@1 (the top source is from the gold paragraph), MRR@10 over documents, and
for the `top_k` = 5 sources shown: sources precision (gold sources / shown sources, over
all answers), sources per answer, answers showing the gold paragraph at all, and answers
quoting a gold sentence (llm-svc's offline extractive engine picking sentences from the
shown sources, as it answers in the default stack). `ms p50` is the ranking alone.

Then the cut-off curve on the default blend: each `max_drop` / `min_score` with the same
columns; `*` marks the gateway's defaults (GatewaySettings).

With `--ttft N` it also starts the default local stack (`ragline up`'s Stack: reranker-svc
with no cross-encoder, the extractive llm-svc), ingests the corpus through the gateway and
asks N questions one at a time straight to the gateway, once with `RANKING=reranker` (the
old default: the reranker-svc bi-encoder call) and once with the default `auto`, and
prints `done.timings` p50s (time to first token, retrieval, ranking).

Run from the repository root (about 2 minutes on 2 cores; `--bi-encoder` adds about 3,
`--ttft 100` about 5):

    .venv/bin/python benchmarks/ranking_squad.py
    .venv/bin/python benchmarks/ranking_squad.py --bi-encoder --ttft 100
    .venv/bin/python benchmarks/ranking_squad.py --ttft-only --ttft 100
    .venv/bin/python benchmarks/ranking_squad.py --json > ranking.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragline_common.passages import Passage
from ragline_common.wire import RetrieveRequest
from ragline_gateway.ranking import Cutoff, blend
from ragline_gateway.settings import GatewaySettings
from ragline_retriever.evaluation.beir import load_beir, service_doc_ids
from ragline_retriever.evaluation.harness import documents_for
from ragline_retriever.ingest import ingest
from ragline_retriever.runtime import Runtime
from ragline_retriever.search import retrieve
from ragline_retriever.settings import RetrieverSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "squad-dev"
CANDIDATES = 50  # what the gateway asks the retriever for (retrieve_candidates)
TOP_K = 5  # sources per answer (rerank_top_n)
WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_DROPS = (None, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
MIN_SCORES = (0.3, 0.4, 0.5, 0.6)

TTFT_TITLE = "default stack, one stream, done.timings p50 (ms)"
log = logging.getLogger("ranking_squad")
Ranked = list[tuple[Any, float]]  # (Hit, score), best first


@dataclass
class Question:
    text: str
    gold: set[str]  # service doc ids of the relevant paragraphs
    hits: list[Any]  # wire Hits, fused order


def _pick_sentences() -> Callable[[list[Passage], str], list[Any]] | None:
    try:
        from ragline_llm.engines.extractive import pick_sentences
    except ImportError:  # llm-svc not installed: that column is left out
        return None
    return pick_sentences


async def collect(dataset: Path) -> tuple[list[Question], list[float]]:
    """Every question's 50 fused candidates from a fresh embedded index; retrieval ms."""
    data = load_beir(dataset)
    data_dir = Path(tempfile.mkdtemp(prefix="ragline-ranking-"))
    rt = Runtime(RetrieverSettings(data_dir=data_dir, query_cache_size=0))
    try:
        await rt.open()
        ids = service_doc_ids(list(data.corpus))
        await ingest(rt, "eval", documents_for(data, ids))
        questions, latencies = [], []
        for qid, text in data.queries.items():
            start = time.perf_counter()
            found = await retrieve(
                rt, RetrieveRequest(query=text, collection="eval", top_k=CANDIDATES)
            )
            latencies.append((time.perf_counter() - start) * 1000)
            gold = {ids[d] for d, grade in data.qrels[qid].items() if grade > 0}
            questions.append(Question(text, gold, list(found.hits)))
        return questions, latencies
    finally:
        await rt.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def rankers(weight_default: float) -> dict[str, Callable[[Question], Ranked]]:
    def fused(q: Question) -> Ranked:
        return [(h, h.score) for h in q.hits]

    def cosine(q: Question) -> Ranked:
        return sorted(((h, h.scores.get("dense") or 0.0) for h in q.hits), key=lambda x: -x[1])

    def fused_cosine(q: Question) -> Ranked:
        top = q.hits[0].score if q.hits else 1.0
        scored = [(h, h.score / top + (h.scores.get("dense") or 0.0)) for h in q.hits]
        return sorted(scored, key=lambda x: -x[1])

    out: dict[str, Callable[[Question], Ranked]] = {
        "fused": fused,
        "cosine": cosine,
        "fused+cosine": fused_cosine,
    }
    for w in sorted({*WEIGHTS, weight_default}):
        out[f"blend w={w:g}"] = lambda q, w=w: blend(q.hits, w)
    return out


def bi_encoder_ranker() -> Callable[[Question], Ranked]:
    from ragline_reranker.scorers import BiEncoderScorer

    scorer = BiEncoderScorer(device="cpu")
    scorer.score([("warm-up query", "warm-up document")])

    def ranked(q: Question) -> Ranked:
        scores = scorer.score([(q.text, h.text) for h in q.hits])
        return sorted(zip(q.hits, scores, strict=True), key=lambda x: -x[1])

    return ranked


def measure(
    questions: Sequence[Question],
    rank: Callable[[Question], Ranked],
    cutoff: Cutoff = Cutoff(),
    picker: Callable[[list[Passage], str], list[Any]] | None = None,
) -> dict[str, float]:
    r1 = mrr = gold_shown = shown = answered_gold = any_gold = 0.0
    ms: list[float] = []
    for q in questions:
        start = time.perf_counter()
        ranked = rank(q)
        ms.append((time.perf_counter() - start) * 1000)
        docs = list(dict.fromkeys(h.doc_id for h, _ in ranked))
        r1 += bool(docs) and docs[0] in q.gold
        mrr += next((1 / i for i, d in enumerate(docs[:10], start=1) if d in q.gold), 0.0)
        sources = cutoff.apply(ranked[:TOP_K])
        gold = [h.doc_id in q.gold for h, _ in sources]
        shown += len(sources)
        gold_shown += sum(gold)
        any_gold += any(gold)
        if picker is not None:
            passages = [Passage(n, h.title, h.text) for n, (h, _) in enumerate(sources, 1)]
            answered_gold += any(gold[p.n - 1] for p in picker(passages, q.text))
    n = len(questions)
    row = {
        "R@1": r1 / n,
        "MRR@10": mrr / n,
        "sources_precision": gold_shown / shown,
        "sources_per_answer": shown / n,
        "gold_shown": any_gold / n,
        "ms_p50": statistics.median(ms),
    }
    if picker is not None:
        row["answer_has_gold_sentence"] = answered_gold / n
    return row


def ttft(dataset: Path, questions: int) -> dict[str, dict[str, float]]:
    """done.timings p50 on the default local stack, old ranking vs the default."""
    import httpx

    from ragline_cli.main import ingest_documents
    from ragline_cli.stack import Stack, StackConfig

    data = load_beir(dataset)
    base = Path(tempfile.mkdtemp(prefix="ragline-ttft-"))
    ids = service_doc_ids(list(data.corpus))
    docs = [d.model_dump() for d in documents_for(data, ids)]
    gateway_env = {"RAGLINE_GATEWAY_CACHE_TTL_S": "0", "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0"}
    config = StackConfig.on_free_ports(base, {"gateway": gateway_env})
    asked = list(data.queries.values())[:questions]
    results: dict[str, dict[str, float]] = {}
    try:
        with Stack(config) as stack:
            ingest_documents(config.public_url, docs, "default")
            gateway = f"http://127.0.0.1:{config.gateway_port}"
            for ranking in ("reranker", "auto"):
                stack.restart("gateway", {**gateway_env, "RAGLINE_GATEWAY_RANKING": ranking})
                readyz = httpx.get(f"{gateway}/readyz", timeout=10).json()
                timings: dict[str, list[float]] = {}
                for text in asked:
                    done = _ask(gateway, text)
                    for key in ("ttft_ms", "retrieve_ms", "rerank_ms"):
                        timings.setdefault(key, []).append(done["timings"][key])
                label = f"{ranking} ({readyz['ranking']['in_use']})"
                results[label] = {k: statistics.median(v) for k, v in timings.items()}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def _ask(gateway: str, text: str) -> dict[str, Any]:
    import httpx

    with httpx.stream("POST", f"{gateway}/api/chat", json={"message": text}, timeout=60) as r:
        r.raise_for_status()
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "done":
                return json.loads(line[6:])
    raise RuntimeError("the answer ended without a done event")


def _table(title: str, rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    width = max(len(name) for name in rows) + 2
    sizes = [max(len(c), 7) + 2 for c in columns]
    lines = [title, " " * width + "".join(f"{c:>{n}}" for c, n in zip(columns, sizes, strict=True))]
    for name, row in rows.items():
        cells = "".join(f"{row[c]:>{n}.3f}" for c, n in zip(columns, sizes, strict=True))
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--bi-encoder", action="store_true", help="also rank with the bi-encoder")
    parser.add_argument("--ttft", type=int, default=0, metavar="N", help="stack TTFT, N questions")
    parser.add_argument("--ttft-only", action="store_true", help="only the stack TTFT part")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.ttft_only:
        timings = ttft(args.dataset, args.ttft or 100)
        print(json.dumps(timings, indent=2) if args.json else _table(TTFT_TITLE, timings))
        return 0

    settings = GatewaySettings()
    default = Cutoff(settings.blend_max_drop, settings.blend_min_score)
    weight = settings.blend_lexical_weight
    questions, retrieve_ms = asyncio.run(collect(args.dataset))
    picker = _pick_sentences()

    ranked_by = rankers(weight)
    if args.bi_encoder:
        ranked_by["bi-encoder (old default)"] = bi_encoder_ranker()
    rankings = {name: measure(questions, rank, picker=picker) for name, rank in ranked_by.items()}
    chosen = f"blend w={weight:g}"
    rankings[f"{chosen} + cut-off*"] = measure(questions, ranked_by[chosen], default, picker)

    curve: dict[str, dict[str, float]] = {}
    for drop in MAX_DROPS:
        cut = Cutoff(drop, settings.blend_min_score)
        mark = "*" if cut == default else ""
        curve[f"max_drop={drop}{mark}"] = measure(questions, ranked_by[chosen], cut, picker)
    for floor in MIN_SCORES:
        for drop in (None, settings.blend_max_drop):
            cut = Cutoff(drop, floor)
            curve[f"min_score={floor} max_drop={drop}"] = measure(
                questions, ranked_by[chosen], cut, picker
            )
    result: dict[str, Any] = {
        "dataset": str(args.dataset),
        "questions": len(questions),
        "retrieve_ms_p50": statistics.median(retrieve_ms),
        "rankings": rankings,
        "cutoff_curve": curve,
    }
    if args.ttft:
        result["ttft"] = ttft(args.dataset, args.ttft)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.dataset.name}: {len(questions)} questions, {CANDIDATES} candidates, "
          f"top {TOP_K} sources; retrieval p50 {result['retrieve_ms_p50']:.1f} ms")  # fmt: skip
    print()
    print(_table("rankings (no cut-off unless marked)", rankings))
    print()
    print(_table(f"cut-off curve on {chosen} (* = the gateway's default)", curve))
    if args.ttft:
        print()
        print(_table(TTFT_TITLE, result["ttft"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
