"""`ragline eval DIR --answers`: answer quality and time to first token of a running stack.

The corpus of a BEIR-layout data set is ingested into a collection of its own (named
after the data set and a fingerprint of the documents as sent, so a changed corpus gets a
new collection) unless it is there already; every query that has qrels is then asked
through `POST /api/chat`, as the web chat asks, and the answers are scored against the
qrels. Definitions: docs/evaluation.md.

The metric functions (`split_answer`, `score_answer`, `summarize`) are pure, so they can
be checked on hand-made answers; the rest talks HTTP through the same helpers (`send`,
the job-based ingest, the SSE reader) as `ragline ingest` and `ragline ask`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from ragline_cli.main import (
    ENDED,
    UNAVAILABLE_RETRIES,
    Unreachable,
    _unreachable_line,
    auth_headers,
    default_url,
    finish_jobs,
    iter_sse,
    retry_after_s,
    send,
    submit_documents,
    wait_for_jobs,
)

# A citation marker as the gateway reads it (gateway/ragline_gateway/citations.py): "[3]"
# or "[1, 2]", three digits at most, so that "[2024]" in a text is no citation.
MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
# A word that is a marker run ("[1]", "[1,2][3]"), perhaps closed by punctuation
# ("[1]." or "[2],"), once the markers' inner spaces are gone; and a sentence's end.
_MARKER_WORD = re.compile(r"^(?:\[\d{1,3}(?:,\d{1,3})*\])+[.!?,;:\"')]*$")
_ENDS_WITH_MARKER = re.compile(r"\[\d{1,3}(?:,\d{1,3})*\][.!?,;:\"')]*$")
_SENTENCE_END = re.compile(r"[.!?][\"')]?$")
_SENTENCE_START = re.compile(r"^[\"'(\[]?[A-Z0-9]")
_STRIP_MARKER = re.compile(r"\s*" + MARKER.pattern)
# An answer sentence shorter than this (a fragment such as "U.S.") is no evidence that the
# answer comes from the gold passage: such a string is found in many passages.
MIN_GOLD_WORDS = 3
# A Markdown heading mark glued into an answer ("... text ## Serving ..."), as a chunk's
# heading leaks into an extractive quote.
_HEADING_MARK = re.compile(r"(?:^|\s)#{1,6}\s")
# The JSON keys, in report order, and what each is (the text report's second column).
KEYS = {
    "top_source_hit": "the first source is a relevant document",
    "sources_precision": "mean share of shown sources that are relevant",
    "sources_per_answer": "mean number of sources shown",
    "citation_precision": "citations whose sentence is in the cited passage",
    "uncited_answers": "answers without any [n]",
    "answers_from_gold": "answers with a sentence found in a relevant passage",
    "first_sentence_from_gold": "answers whose first sentence is in a relevant passage",
    "heading_marks": 'answers holding a Markdown heading mark ("## ")',
    "ttft_p50_ms": "time to first token, client side, p50",
    "ttft_p95_ms": "time to first token, client side, p95",
    "server_ttft_p50_ms": "the gateway's own done.timings.ttft_ms, p50",
    "questions": "questions asked",
    "answered": "answers completed (the metrics are over these)",
    "errors": "questions that ended in an error",
    "citations": "(sentence, cited passage) pairs",
    "cached": "answers served from the answer cache (not in TTFT)",
    "degraded": "answers with a degraded stage",
}
COLLECTION_MAX = 63  # COLLECTION_PATTERN: ^[a-z][a-z0-9_]{0,62}$


def normalize(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Sentence:
    text: str  # markers stripped, whitespace normalised
    cited: tuple[int, ...]  # the passage numbers its markers name, ascending


def split_answer(answer: str) -> list[Sentence]:
    """The answer's sentences, each with the passages its markers cite.

    The (whitespace-normalised) answer is cut after a sentence's end (`.`, `!` or `?`,
    perhaps closed by a quote or parenthesis) where a sentence starts next, and after every
    run of markers that more text follows. Markers right after a sentence's end ("France.
    [1] They") belong to the sentence before them, as in "France [1]. They"; a marker
    closes the text it cites even where no full stop does ("as follows: [2] Many ...", a
    passage that starts mid-sentence), and one in mid-sentence ("Rollo [1] swore ...")
    cites the words before it. Markers opening the answer cite its first sentence.
    """
    text = MARKER.sub(lambda m: "[" + ",".join(m.group(1).replace(" ", "").split(",")) + "]",
                      normalize(answer))  # fmt: skip
    words = text.split(" ") if text else []
    pieces: list[list[str]] = [[]]
    for i, word in enumerate(words):
        pieces[-1].append(word)
        following = words[i + 1] if i + 1 < len(words) else ""
        if not following or _MARKER_WORD.match(following):
            continue  # a marker run stays with the words before it
        if all(_MARKER_WORD.match(w) for w in pieces[-1]):
            continue  # markers opening the answer cite the sentence they open
        if _ENDS_WITH_MARKER.search(word) or (
            _SENTENCE_END.search(word) and _SENTENCE_START.match(following)
        ):
            pieces.append([])
    sentences = []
    for piece in pieces:
        joined = " ".join(piece)
        cited = sorted({int(n) for m in MARKER.finditer(joined) for n in m.group(1).split(",")})
        stripped = normalize(_STRIP_MARKER.sub("", joined))
        if stripped or cited:
            sentences.append(Sentence(stripped, tuple(cited)))
    return sentences


@dataclass
class AnswerScore:
    sources: int
    relevant_sources: int
    top_hit: bool
    citations: int
    supported_citations: int
    cited: bool
    from_gold: bool
    first_from_gold: bool = False
    heading_marks: bool = False
    ttft_ms: float | None = None
    server_ttft_ms: float | None = None
    cached: bool = False
    degraded: bool = False


def score_answer(
    answer: str,
    sources: Sequence[Mapping[str, Any]],
    relevant: Mapping[str, int],
    gold_texts: Sequence[str],
) -> AnswerScore:
    """One answer against its question's qrels.

    `sources` as the `sources` event has them (`n`, `doc_id`, `text`), with `doc_id`
    already mapped back to corpus ids; `relevant` the query's qrels (corpus id → grade);
    `gold_texts` the relevant documents' texts from the corpus.
    """
    ordered = sorted(sources, key=lambda s: s["n"])
    shown = [relevant.get(s["doc_id"], 0) > 0 for s in ordered]
    passages = {s["n"]: normalize(s.get("text") or "") for s in ordered}
    gold = [normalize(t) for t in gold_texts]
    sentences = split_answer(answer)
    citations = supported = 0
    for sentence in sentences:
        for n in sentence.cited:
            citations += 1
            if sentence.text and sentence.text in passages.get(n, ""):
                supported += 1

    def in_gold(s: Sentence) -> bool:
        return len(s.text.split()) >= MIN_GOLD_WORDS and any(s.text in g for g in gold)

    quoted = [s for s in sentences if s.text]
    return AnswerScore(
        sources=len(ordered),
        relevant_sources=sum(shown),
        top_hit=bool(shown) and shown[0],
        citations=citations,
        supported_citations=supported,
        cited=MARKER.search(answer) is not None,
        from_gold=any(in_gold(s) for s in quoted),
        first_from_gold=bool(quoted) and in_gold(quoted[0]),
        heading_marks=_HEADING_MARK.search(answer) is not None,
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scores: Sequence[AnswerScore], questions: int, errors: int) -> dict[str, Any]:
    """The report (`KEYS`): shares are over the answers, citation precision over all
    citations (None without any), TTFT over the answers not served from the cache."""
    from ragline_retriever.evaluation.metrics import percentile

    ttft = [s.ttft_ms for s in scores if s.ttft_ms is not None and not s.cached]
    server = [s.server_ttft_ms for s in scores if s.server_ttft_ms is not None and not s.cached]
    citations = sum(s.citations for s in scores)

    def share(flag: str) -> float | None:
        return _mean([1.0 if getattr(s, flag) else 0.0 for s in scores])

    uncited = _mean([0.0 if s.cited else 1.0 for s in scores])
    return {
        "top_source_hit": share("top_hit"),
        "sources_precision": _mean(
            [s.relevant_sources / s.sources if s.sources else 0.0 for s in scores]
        ),
        "sources_per_answer": _mean([float(s.sources) for s in scores]),
        "citation_precision": (
            sum(s.supported_citations for s in scores) / citations if citations else None
        ),
        "uncited_answers": uncited,
        "answers_from_gold": share("from_gold"),
        "first_sentence_from_gold": share("first_from_gold"),
        "heading_marks": share("heading_marks"),
        "ttft_p50_ms": percentile(ttft, 50) if ttft else None,
        "ttft_p95_ms": percentile(ttft, 95) if ttft else None,
        "server_ttft_p50_ms": percentile(server, 50) if server else None,
        "questions": questions,
        "answered": len(scores),
        "errors": errors,
        "citations": citations,
        "cached": sum(1 for s in scores if s.cached),
        "degraded": sum(1 for s in scores if s.degraded),
    }


def rounded(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (round(v, 1) if k.endswith("_ms") else round(v, 4)) if isinstance(v, float) else v
        for k, v in report.items()
    }


def render_text(report: Mapping[str, Any], header: str) -> str:
    lines = [header, ""]
    for key, meaning in KEYS.items():
        value = report.get(key)
        if value is None:
            shown = "-"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = f"{value:.1f}" if key.endswith("_ms") else f"{value:.3f}"
        lines.append(f"  {key:<24} {shown:>9}   {meaning}")
    return "\n".join(lines)


# --- the data set as ingested ------------------------------------------------------------


def collection_name(dataset: str, docs: Sequence[Mapping[str, Any]]) -> str:
    """`eval_<data set>_<fingerprint>`: the fingerprint is over the documents exactly as
    sent, so a changed corpus (or a changed way of sending it) gets a collection of its own
    and an unchanged one finds the collection it filled before."""
    digest = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d["id"]):
        digest.update(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) + b"\n")
    slug = re.sub(r"[^a-z0-9]+", "_", dataset.lower()).strip("_") or "data"
    fingerprint = digest.hexdigest()[:12]
    return f"eval_{slug[: COLLECTION_MAX - len(fingerprint) - 6]}_{fingerprint}"


def corpus_documents(dataset: Any, ids: Mapping[str, str], max_title: int) -> list[dict[str, Any]]:
    """The corpus as the retrieval eval ingests it (harness.documents_for): no metadata,
    the corpus title, the title as text where there is no text."""
    return [
        {"id": ids[doc.id], "title": doc.title[:max_title], "text": doc.text.strip() or doc.title}
        for doc in dataset.corpus.values()
    ]


def ingested(client: httpx.Client, collection: str, documents: int) -> bool:
    """Whether `collection` already holds the corpus: it is listed with chunks, and the
    ingest jobs the server still lists for it succeeded for at least `documents`
    documents, none unfinished (those are waited for first). A server that no longer
    lists the jobs (it keeps the latest 1000) gets the corpus again: ingest is idempotent."""
    while True:
        response = send(client, "GET", "/api/collections")
        response.raise_for_status()
        chunks = {c["name"]: c["chunks"] for c in response.json()["collections"]}
        if chunks.get(collection, 0) <= 0:
            return False
        response = send(
            client, "GET", "/api/jobs", params={"collection": collection, "limit": 1000}
        )
        if response.status_code != 200:
            return False
        jobs = [j for j in response.json().get("jobs", []) if j.get("collection") == collection]
        pending = [j for j in jobs if j["status"] not in ENDED]
        if not pending:
            done = sum(j["documents"] for j in jobs if j["status"] == "succeeded")
            return done >= documents
        print(
            f"ragline eval: waiting for {len(pending)} ingest jobs of {collection}", file=sys.stderr
        )
        wait_for_jobs(client, pending)


# --- asking -------------------------------------------------------------------------------


@dataclass
class Asked:
    text: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    ttft_ms: float | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    degraded: list[str] = field(default_factory=list)
    error: str | None = None


def ask(client: httpx.Client, collection: str, question: str) -> Asked:
    """One question through `/api/chat`; TTFT from sending the request to the first
    `token` event. A rate limit (429) or a 503 with Retry-After is waited out and the
    question asked again, timed from the new request."""
    body = {"message": question, "collection": collection}
    unavailable = 0
    while True:
        start = time.perf_counter()
        with client.stream("POST", "/api/chat", json=body) as response:
            status = response.status_code
            if status == 429 or (
                status == 503
                and "retry-after" in response.headers
                and unavailable < UNAVAILABLE_RETRIES
            ):
                unavailable += status == 503
                response.read()
                time.sleep(retry_after_s(response))
                continue
            if status >= 400:
                response.read()
                return Asked(error=f"HTTP {status}: {response.text[:300]}")
            asked = Asked()
            parts: list[str] = []
            for event, data in iter_sse(response):
                if event == "sources":
                    asked.sources = data.get("sources", [])
                elif event == "token":
                    if asked.ttft_ms is None:
                        asked.ttft_ms = (time.perf_counter() - start) * 1000
                    parts.append(data.get("text", ""))
                elif event == "error":
                    return Asked(error=f"{data.get('code')}: {data.get('message')}")
                elif event == "done":
                    asked.text = "".join(parts)
                    asked.timings = data.get("timings") or {}
                    asked.cached = bool(data.get("cached"))
                    asked.degraded = list(data.get("degraded") or [])
                    return asked
            return Asked(error="the stream ended without a done event")


def ask_all(
    client: httpx.Client, collection: str, questions: Sequence[str], concurrency: int
) -> list[Asked]:
    done = 0
    lock = threading.Lock()
    tty = sys.stderr.isatty()

    def one(question: str) -> Asked:
        nonlocal done
        asked = ask(client, collection, question)
        with lock:
            done += 1
            if tty:
                print(f"\rasked {done}/{len(questions)}", end="", file=sys.stderr, flush=True)
        return asked

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, questions))
    if tty:
        print(file=sys.stderr)
    return results


# --- the command --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        from ragline_common.wire import MAX_TITLE_CHARS
        from ragline_retriever.evaluation.beir import service_doc_ids
    except ModuleNotFoundError as exc:
        from ragline_cli.evaluate import NOT_INSTALLED

        print(NOT_INSTALLED.format(name=exc.name), file=sys.stderr)
        return 2
    url = args.url or default_url()[0]
    from ragline_cli.evaluate import load_dataset

    dataset = load_dataset(args)
    if dataset is None:
        return 2
    ids = service_doc_ids(list(dataset.corpus))
    back = {service: corpus for corpus, service in ids.items()}
    docs = corpus_documents(dataset, ids, MAX_TITLE_CHARS)
    collection = args.collection or collection_name(dataset.name, docs)
    queries = list(dataset.queries.items())[: args.limit]
    client = httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=600), headers=auth_headers())
    try:
        with client:
            if not args.reingest and ingested(client, collection, len(docs)):
                print(f"ragline eval: {collection} holds the corpus already", file=sys.stderr)
            else:
                print(
                    f"ragline eval: ingesting {len(docs)} documents into {collection}",
                    file=sys.stderr,
                )
                count, chunks = finish_jobs(client, submit_documents(client, docs, collection))
                print(
                    f"ragline eval: ingested {count} documents ({chunks} chunks)", file=sys.stderr
                )
            started = time.perf_counter()
            results = ask_all(client, collection, [q for _, q in queries], args.concurrency)
            elapsed = time.perf_counter() - started
    except (Unreachable, httpx.TransportError) as exc:
        print(_unreachable_line(url, exc), file=sys.stderr)
        return 2
    except httpx.HTTPStatusError as exc:
        print(
            f"ragline eval: {exc.response.status_code} from {exc.request.url}: "
            f"{exc.response.text[:300]} (ingest and the collection list need an admin key "
            "in RAGLINE_API_KEY where the gateway has keys)",
            file=sys.stderr,
        )
        return 2

    scores: list[AnswerScore] = []
    errors = 0
    for (query_id, question), asked in zip(queries, results, strict=True):
        if asked.error is not None:
            errors += 1
            print(f"ragline eval: {query_id} ({question!r}): {asked.error}", file=sys.stderr)
            continue
        relevant = dataset.qrels[query_id]
        sources = [
            {**s, "doc_id": back.get(s.get("doc_id"), s.get("doc_id"))} for s in asked.sources
        ]
        gold = [dataset.corpus[d].text for d in relevant if d in dataset.corpus]
        score = score_answer(asked.text, sources, relevant, gold)
        score.ttft_ms = asked.ttft_ms
        server_ttft = asked.timings.get("ttft_ms")
        score.server_ttft_ms = float(server_ttft) if isinstance(server_ttft, int | float) else None
        score.cached = asked.cached
        score.degraded = bool(asked.degraded)
        scores.append(score)
    report = rounded(summarize(scores, len(queries), errors))
    header = (
        f"answers on {dataset.name}: {len(queries)} questions at concurrency "
        f"{args.concurrency} in {elapsed:.0f} s, collection {collection} at {url}"
    )
    text = render_text(report, header)
    if args.json:
        print(text, file=sys.stderr)
        print(orjson.dumps({"answers": report}).decode(), flush=True)
    else:
        print(text, flush=True)
    if report["cached"]:
        print(
            f"ragline eval: {report['cached']} answers came from the answer cache; TTFT is "
            "over the others (see docs/evaluation.md)",
            file=sys.stderr,
        )
    return 1 if errors or not scores else 0
