"""`ragline eval DIR`: retrieval quality of the hybrid retriever on a BEIR data set;
`ragline eval DIR --answers`: answer quality and time to first token of a running stack.

Ingests the corpus into a fresh embedded index (tantivy + Milvus Lite in a temporary
directory, removed afterwards unless `--keep DIR`) through the retriever's own code, and
prints recall@1/5/20, MRR@10 and nDCG@10 with query latency p50/p99 for the modes
lexical, dense, hybrid and hybrid+rerank. `--json` prints one JSON object
`{mode: {metric: value}}` and nothing else on stdout; progress and logs go to stderr.

Retriever settings (RRF k, candidate depths, weights, chunking, embedding model) come
from the `RAGLINE_RETRIEVER_*` environment as for the service; the backends are always
the embedded ones. The retriever package is imported only when this command runs, so a
CLI installed without it still works for everything that talks HTTP.

With `--answers` nothing is indexed in-process (the package is still needed, for its
BEIR loader): the corpus is ingested into a collection of the stack at `--url` (if it is
not there yet) and every query is asked through `/api/chat`; it reports top_source_hit,
sources_precision, sources_per_answer, citation_precision, uncited_answers,
answers_from_gold and client-side TTFT p50/p95. `--json` then prints
`{"answers": {metric: value}}`. `--url` follows the other commands: --url, env
RAGLINE_URL, the URL a running `ragline up` recorded in run/stack.json,
http://127.0.0.1:8080. Definitions and how "there yet" is decided: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

NOT_INSTALLED = (
    "ragline eval runs the retriever in-process and needs its package: install retriever-svc "
    "(`pip install -e retriever-svc`, package ragline-retriever); missing module: {name}"
)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dataset", type=Path, metavar="DIR", help="a data set in BEIR layout")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print only one JSON object: {mode: {metric: value}}; "
        'with --answers {"answers": {metric: value}}',
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="build the index here (empty or new) and keep it"
    )
    parser.add_argument(
        "--reranker-model",
        metavar="PATH",
        default=os.environ.get("RAGLINE_RERANKER_MODEL") or None,
        help="a trained cross-encoder checkpoint for hybrid+rerank (env RAGLINE_RERANKER_MODEL)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also compare RRF k, candidate depth and weights"
    )
    parser.add_argument("--split", default="test", help="qrels file: qrels/SPLIT.tsv")
    parser.add_argument("--verbose", action="store_true", help="the retriever's logs too")
    answers = parser.add_argument_group(
        "answers", "answer quality through a running stack (docs/evaluation.md)"
    )
    answers.add_argument(
        "--answers",
        action="store_true",
        help="ask every query through /api/chat of a running stack and score the answers "
        "(instead of the in-process retrieval eval)",
    )
    answers.add_argument(
        "--url",
        default=None,
        help="the stack's URL (precedence: --url, env RAGLINE_URL, the URL a running "
        "`ragline up` recorded in run/stack.json, http://127.0.0.1:8080)",
    )
    answers.add_argument(
        "--collection",
        default=None,
        help="the collection to fill and ask (default: eval_<data set>_<corpus fingerprint>)",
    )
    answers.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N queries"
    )
    answers.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="questions in flight at once (default 1: TTFT of a single stream)",
    )
    answers.add_argument(
        "--reingest",
        action="store_true",
        help="ingest the corpus even when the collection holds it already",
    )
    return parser


_ANSWERS_ONLY = ("url", "collection", "limit", "concurrency", "reingest")
_RETRIEVAL_ONLY = ("keep", "sweep")


def _check_options(args: argparse.Namespace) -> str:
    """What is wrong with the combination of options, or ''."""
    if args.answers:
        given = [f"--{n}" for n in _RETRIEVAL_ONLY if getattr(args, n)]
        if given:
            return f"{' and '.join(given)} apply to the retrieval eval, not to --answers"
        if args.limit is not None and args.limit < 1:
            return "--limit must be at least 1"
        if args.concurrency is not None and not 1 <= args.concurrency <= 64:
            return "--concurrency must be within 1..64"
        args.concurrency = args.concurrency or 1
        return ""
    given = [f"--{n}" for n in _ANSWERS_ONLY if getattr(args, n) not in (None, False)]
    return f"{', '.join(given)} need --answers" if given else ""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` on the `ragline` command's subparsers."""
    summary = "retrieval quality on a BEIR data set; --answers: answer quality of a stack"
    parser = subparsers.add_parser(
        "eval",
        help=summary,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return _configure(parser)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr, file descriptor included.

    Libraries print (and Milvus Lite starts a server process that inherits fd 1); with
    `--json` stdout must carry the JSON alone, so fd 1 points at stderr until the result
    is ready.
    """
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        fd = None  # not a real file (captured by a test runner): the Python level suffices
    saved = os.dup(fd) if fd is not None else None
    try:
        if fd is not None:
            os.dup2(sys.stderr.fileno(), fd)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None and fd is not None:
            os.dup2(saved, fd)
            os.close(saved)


def _configure_logging(verbose: bool) -> None:
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ragline.eval").setLevel(logging.INFO)
    if not verbose:
        # Milvus Lite's in-process gRPC server logs a traceback each time pymilvus asks it
        # for a timestamp it does not implement (while creating an index); it is harmless.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def load_dataset(args: argparse.Namespace) -> Any:
    """`args.dataset` loaded (its warnings on stderr), or None after saying why not; both
    `ragline eval` modes read their data set through this."""
    from ragline_retriever.evaluation.beir import DatasetError, load_beir

    try:
        dataset = load_beir(args.dataset, split=args.split)
    except DatasetError as exc:
        print(f"ragline eval: {exc}", file=sys.stderr)
        return None
    for warning in dataset.warnings:
        print(f"ragline eval: warning: {warning}", file=sys.stderr)
    return dataset


def run(args: argparse.Namespace) -> int:
    problem = _check_options(args)
    if problem:
        print(f"ragline eval: {problem}", file=sys.stderr)
        return 2
    _configure_logging(args.verbose)
    if args.answers:
        from ragline_cli import answers

        return answers.run(args)
    if args.keep is not None and args.keep.exists():
        if not args.keep.is_dir() or any(args.keep.iterdir()):
            print(
                f"ragline eval: --keep {args.keep} must be an empty or new directory",
                file=sys.stderr,
            )
            return 2
    with _stdout_to_stderr():
        try:
            from ragline_retriever.evaluation.harness import EvalOptions, evaluate, load_reranker
            from ragline_retriever.evaluation.report import render_json, render_text
        except ModuleNotFoundError as exc:
            print(NOT_INSTALLED.format(name=exc.name), file=sys.stderr)
            return 2
        dataset = load_dataset(args)
        if dataset is None:
            return 2
        if not args.verbose:
            with contextlib.suppress(ImportError):
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # "Loading weights" bars, per model load
        reranker, note = load_reranker(args.reranker_model)
        if reranker is None:
            print(f"ragline eval: hybrid+rerank will not be measured: {note}", file=sys.stderr)
        options = EvalOptions(
            keep=args.keep, reranker=reranker, reranker_note=note, sweep=args.sweep
        )
        result = asyncio.run(evaluate(dataset, options))
        text = render_text(result)
    if args.json:
        print(text, file=sys.stderr)
        print(render_json(result), flush=True)
    else:
        print(text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`ragline eval` on its own: `python -m ragline_cli.evaluate DIR [options]`."""
    parser = argparse.ArgumentParser(
        prog="ragline eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return run(_configure(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
