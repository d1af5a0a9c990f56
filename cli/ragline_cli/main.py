"""`ragline`: run the local stack, ingest files, ask questions.

ragline up                   the whole stack in the foreground (Ctrl-C stops it all)
ragline ingest PATH          a file or a folder of .md/.txt files
ragline ask "question"       stream an answer with its sources
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from ragline_cli.documents import iter_documents
from ragline_cli.stack import REPO_ROOT, Stack, StackConfig

BATCH = 32


def default_url() -> str:
    return os.environ.get(
        "RAGLINE_URL", f"http://127.0.0.1:{os.environ.get('RAGLINE_NGINX_PORT', 8080)}"
    )


def ingest(url: str, path: Path, collection: str) -> tuple[int, int]:
    docs = list(iter_documents(path))
    if not docs:
        raise SystemExit(f"no .md/.txt/.rst files under {path}")
    total_chunks = 0
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(0, len(docs), BATCH):
            response = client.post(
                f"/api/collections/{collection}/documents", json={"documents": docs[i : i + BATCH]}
            )
            if response.status_code >= 400:
                raise SystemExit(f"ingest failed ({response.status_code}): {response.text}")
            total_chunks += int(response.json().get("chunks", 0))
    return len(docs), total_chunks


def iter_sse(response: httpx.Response) -> Any:
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, orjson.loads(line[5:].strip())
            event = "message"


def ask(url: str, question: str, collection: str | None) -> int:
    body: dict[str, Any] = {"message": question}
    if collection:
        body["collection"] = collection
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=3600)) as client:
        with client.stream("POST", "/api/chat", json=body) as response:
            if response.status_code >= 400:
                response.read()
                print(f"error {response.status_code}: {response.text}", file=sys.stderr)
                return 1
            sources: list[dict[str, Any]] = []
            for event, data in iter_sse(response):
                if event == "sources":
                    sources = data["sources"]
                elif event == "token":
                    print(data["text"], end="", flush=True)
                elif event == "error":
                    print(f"\n[error] {data['message']}", file=sys.stderr)
                    return 1
                elif event == "done":
                    print()
                    for s in sources:
                        print(f"  [{s['n']}] {s['title'] or s['doc_id']}  ({s['doc_id']})")
                    if data.get("degraded"):
                        print(f"  degraded: {', '.join(data['degraded'])}")
    return 0


def up(no_ingest: bool) -> int:
    config = StackConfig()
    stack = Stack(config)
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("starting ragline (first start loads the embedding model; logs in run/logs/)")
    try:
        stack.start()
        missing = config.missing_binaries()
        if missing:
            print(f"note: {' and '.join(missing)} not installed; running without (see README)")
        if not no_ingest:
            docs, chunks = ingest(config.public_url, REPO_ROOT / "samples", "default")
            print(f"ingested {docs} sample documents ({chunks} chunks) into 'default'")
        print(f"\nragline is up: {config.public_url}")
        print('  try: .venv/bin/ragline ask "How do honeybees tell each other where flowers are?"')
        print("  Ctrl-C stops everything.")
        while not stopping:
            dead = stack.dead()
            if dead:
                print(f"stopping: {', '.join(dead)} exited; see run/logs/", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        print("stopping ragline ...")
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ragline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole stack in the foreground")
    p_up.add_argument("--no-ingest", action="store_true", help="do not ingest the sample corpus")
    p_ingest = sub.add_parser("ingest", help="ingest a file or a folder")
    p_ingest.add_argument("path", type=Path)
    p_ask = sub.add_parser("ask", help="ask a question and stream the answer")
    p_ask.add_argument("question")
    for p in (p_ingest, p_ask):
        p.add_argument("--url", default=default_url(), help="ragline's URL (env RAGLINE_URL)")
        p.add_argument("--collection", default=None)
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.no_ingest)
    if args.command == "ingest":
        if not args.path.exists():
            parser.error(f"{args.path} does not exist")
        docs, chunks = ingest(args.url, args.path, args.collection or "default")
        print(f"ingested {docs} documents ({chunks} chunks)")
        return 0
    return ask(args.url, args.question, args.collection)


if __name__ == "__main__":
    sys.exit(main())
