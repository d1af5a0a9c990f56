"""Load a retrieval data set in BEIR layout, refusing a malformed one with a clear message.

Layout: `corpus.jsonl` (`{"_id", "title", "text"}`), `queries.jsonl` (`{"_id", "text"}`)
and `qrels/<split>.tsv` (`query-id<TAB>corpus-id<TAB>score`, header line first). A score
above 0 marks a relevant document; only queries with at least one relevant document are
evaluated. Errors name the file and line, because a silently half-read data set gives
numbers that look plausible and mean nothing.

Dangling references are warnings, not errors: real BEIR sets have qrels for documents
missing from the corpus (they stay relevant and simply cannot be found, as in the
official scoring) and for queries not in `queries.jsonl` (skipped: there is no text).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragline_common.wire import MAX_QUERY_CHARS, is_doc_id

QRELS_HEADER = ("query-id", "corpus-id", "score")


class DatasetError(ValueError):
    """The data set is not in BEIR layout or is malformed; the message says where."""


@dataclass(frozen=True)
class CorpusDocument:
    id: str
    title: str
    text: str


@dataclass
class BeirDataset:
    name: str
    corpus: dict[str, CorpusDocument]
    # Evaluated queries only: each has at least one relevant document.
    queries: dict[str, str]
    # query id → {corpus id: grade > 0}
    qrels: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing (BEIR layout: corpus.jsonl, queries.jsonl, qrels/)")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _string(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {key!r} must be a string, got {value!r:.80}")
    return value


def load_corpus(path: Path) -> tuple[dict[str, CorpusDocument], list[str]]:
    corpus: dict[str, CorpusDocument] = {}
    warnings: list[str] = []
    empty = 0
    for number, record in _jsonl(path):
        where = f"{path}:{number}"
        doc_id = _string(record, "_id", where)
        if not doc_id:
            raise DatasetError(f"{where}: empty '_id'")
        if doc_id in corpus:
            raise DatasetError(f"{where}: duplicate document id {doc_id!r}")
        title = _string(record, "title", where, required=False)
        text = _string(record, "text", where, required=False)
        if not text.strip() and not title.strip():
            empty += 1  # nothing to index; it can never be retrieved
            continue
        corpus[doc_id] = CorpusDocument(doc_id, title, text)
    if not corpus:
        raise DatasetError(f"{path}: no documents")
    if empty:
        warnings.append(f"{empty} corpus documents have neither title nor text; not indexed")
    return corpus, warnings


def load_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, record in _jsonl(path):
        where = f"{path}:{number}"
        query_id = _string(record, "_id", where)
        if not query_id:
            raise DatasetError(f"{where}: empty '_id'")
        if query_id in queries:
            raise DatasetError(f"{where}: duplicate query id {query_id!r}")
        queries[query_id] = _string(record, "text", where)
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Relevant documents per query (grade > 0); the header line is required."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing (BEIR layout: qrels/<split>.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        header = lines.readline().rstrip("\r\n").split("\t")
        if tuple(h.strip() for h in header) != QRELS_HEADER:
            raise DatasetError(
                f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', "
                f"got {'<TAB>'.join(header)!r:.120}"
            )
        for number, line in enumerate(lines, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 3 or not fields[0] or not fields[1]:
                raise DatasetError(
                    f"{path}:{number}: expected 3 tab-separated fields "
                    f"(query-id, corpus-id, score), got {line.strip()!r:.120}"
                )
            query_id, doc_id, raw = fields
            try:
                score = int(raw)
            except ValueError as exc:
                raise DatasetError(
                    f"{path}:{number}: score must be an integer, got {raw!r:.40}"
                ) from exc
            if score > 0:
                qrels.setdefault(query_id, {})[doc_id] = score
    return qrels


def load_beir(directory: Path, split: str = "test") -> BeirDataset:
    """The data set under `directory`, restricted to the queries that have relevant docs."""
    if not directory.is_dir():
        raise DatasetError(f"{directory} is not a directory")
    corpus, warnings = load_corpus(directory / "corpus.jsonl")
    all_queries = load_queries(directory / "queries.jsonl")
    qrels = load_qrels(directory / "qrels" / f"{split}.tsv")

    unknown_queries = sorted(q for q in qrels if q not in all_queries)
    if unknown_queries:
        warnings.append(
            f"{len(unknown_queries)} queries in the qrels are not in queries.jsonl; skipped "
            f"(first: {unknown_queries[0]!r})"
        )
    too_long = sorted(
        q for q in qrels if q in all_queries and len(all_queries[q].strip()) > MAX_QUERY_CHARS
    )
    if too_long:
        warnings.append(
            f"{len(too_long)} queries exceed {MAX_QUERY_CHARS} characters (the service "
            f"refuses them); skipped (first: {too_long[0]!r})"
        )
    skip = set(unknown_queries) | set(too_long)
    for query_id in qrels:
        if query_id not in skip and not all_queries[query_id].strip():
            raise DatasetError(f"{directory / 'queries.jsonl'}: query {query_id!r} has no text")
    evaluated = {q: all_queries[q] for q in all_queries if q in qrels and q not in skip}
    if not evaluated:
        raise DatasetError(
            f"{directory}: no query has a relevant document (score > 0) in qrels/{split}.tsv"
        )
    missing_docs = sorted({d for q in evaluated for d in qrels[q] if d not in corpus})
    if missing_docs:
        warnings.append(
            f"{len(missing_docs)} relevant documents are not in the corpus; they count as "
            f"not found (first: {missing_docs[0]!r})"
        )
    return BeirDataset(
        name=directory.resolve().name,
        corpus=corpus,
        queries=evaluated,
        qrels={q: qrels[q] for q in evaluated},
        warnings=warnings,
    )


def service_doc_ids(corpus_ids: list[str]) -> dict[str, str]:
    """Corpus id → the document id to ingest under.

    The service accepts any id `is_doc_id` accepts (ragline_common.wire: parentheses,
    spaces and accents included); a corpus id that it refuses (a control character,
    whitespace at an end, a `..` segment, over 512 bytes) gets a generated one, and the
    harness maps hits back. Valid ids are kept, so a kept index (`--keep`) shows the data
    set's own ids.
    """
    taken = {i for i in corpus_ids if is_doc_id(i)}
    mapping: dict[str, str] = {}
    counter = 0
    for corpus_id in corpus_ids:
        if corpus_id in taken:
            mapping[corpus_id] = corpus_id
            continue
        while f"beir-{counter}" in taken:
            counter += 1
        mapping[corpus_id] = f"beir-{counter}"
        taken.add(mapping[corpus_id])
    return mapping
