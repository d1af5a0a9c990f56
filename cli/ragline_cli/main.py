"""`ragline`: run the local stack, ingest files, ask questions.

ragline up                   the whole stack in the foreground (Ctrl-C stops it all)
ragline ingest PATH          a file or a folder of .md/.txt/.rst/.html/.pdf files
ragline ask "question"       stream an answer with its sources
ragline verify COLLECTION    compare the lexical and dense indexes of a collection
ragline eval DIR             retrieval quality on a BEIR-layout data set (in-process)
ragline keys new ...         a new API key and its entry for the gateway's keys file

ingest, ask and verify send the API key in RAGLINE_API_KEY when it is set.
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

from ragline_cli import evaluate, keys
from ragline_cli.documents import iter_documents, iter_uploads
from ragline_cli.stack import REPO_ROOT, Stack, StackConfig

JOB_BATCH = 1000
JOB_BYTES = 16 * 1024 * 1024


def default_url() -> str:
    return os.environ.get(
        "RAGLINE_URL", f"http://127.0.0.1:{os.environ.get('RAGLINE_NGINX_PORT', 8080)}"
    )


def auth_headers() -> dict[str, str]:
    key = os.environ.get("RAGLINE_API_KEY", "")
    return {"authorization": f"Bearer {key}"} if key else {}


def send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request, waiting out the key's rate limit (429 + Retry-After) as often as it
    takes: a big ingest is many requests, and a limit is no reason to give up."""
    while True:
        response = client.request(method, url, **kwargs)
        if response.status_code != 429:
            return response
        time.sleep(min(60.0, float(response.headers.get("retry-after", "1"))))


def _submitted(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise SystemExit(f"ingest failed ({response.status_code}): {response.text}")
    return response.json()


def wait_for_jobs(client: httpx.Client, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Polls until every job has ended, showing progress on stderr; the ended jobs."""
    ended: dict[str, dict[str, Any]] = {}
    total = sum(j["documents"] for j in jobs) or 1
    last = ""
    while len(ended) < len(jobs):
        done = 0
        for job in jobs:
            if job["job_id"] not in ended:
                try:
                    response = send(client, "GET", f"/api/jobs/{job['job_id']}")
                except httpx.TransportError:
                    continue  # a restart or a blip: the job is durable, poll again
                if response.status_code >= 500:
                    continue
                job = response.raise_for_status().json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    ended[job["job_id"]] = job
            done += ended.get(job["job_id"], job)["documents_done"]
        line = f"\ringesting: {done}/{total} documents"
        if sys.stderr.isatty() and line != last:
            print(line, end="", file=sys.stderr, flush=True)
            last = line
        if len(ended) < len(jobs):
            time.sleep(0.2)
    if last:
        print(file=sys.stderr)
    return [ended[j["job_id"]] for j in jobs]


def _batches(docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Up to JOB_BATCH documents and JOB_BYTES of JSON per job request, under the
    retriever's body limit."""
    batches: list[list[dict[str, Any]]] = [[]]
    size = 0
    for doc in docs:
        doc_size = len(orjson.dumps(doc))
        if batches[-1] and (len(batches[-1]) >= JOB_BATCH or size + doc_size > JOB_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(doc)
        size += doc_size
    return [b for b in batches if b]


def ingest(url: str, path: Path, collection: str) -> tuple[int, int]:
    """Text files go as JSON documents in jobs of up to JOB_BATCH; HTML and PDF files are
    uploaded for the retriever to parse. Waits for every job; exits on a failed one."""
    docs = list(iter_documents(path))
    uploads = list(iter_uploads(path))
    if not docs and not uploads:
        raise SystemExit(f"no .md/.txt/.rst/.html/.pdf files under {path}")
    root = path if path.is_dir() else path.parent
    with httpx.Client(base_url=url, timeout=600, headers=auth_headers()) as client:
        jobs = [
            _submitted(
                send(client, "POST", f"/api/collections/{collection}/jobs", json={"documents": b})
            )
            for b in _batches(docs)
        ]
        for file, doc_id, content_type in uploads:
            params = {
                "filename": file.name,
                "id": doc_id,
                "metadata": orjson.dumps({"path": str(file.relative_to(root))}).decode(),
            }
            jobs.append(
                _submitted(
                    send(
                        client,
                        "POST",
                        f"/api/collections/{collection}/files",
                        params=params,
                        content=file.read_bytes(),
                        headers={"content-type": content_type},
                    )
                )
            )
        ended = wait_for_jobs(client, jobs)
    failed = [j for j in ended if j["status"] != "succeeded"]
    if failed:
        for job in failed:
            print(f"job {job['job_id']} {job['status']}: {job.get('error')}", file=sys.stderr)
        raise SystemExit(f"{len(failed)} of {len(ended)} ingest jobs did not succeed")
    return sum(j["documents"] for j in ended), sum(j["chunks"] for j in ended)


def verify(url: str, collection: str) -> int:
    with httpx.Client(base_url=url, timeout=600, headers=auth_headers()) as client:
        response = client.get(f"/api/collections/{collection}/verify")
    if response.status_code >= 400:
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return 2
    report = response.json()
    print(
        f"{collection}: {report['lexical_chunks']} chunks in the lexical index, "
        f"{report['dense_chunks']} in the dense index, {report['pending_writes']} writes pending"
    )
    for side in ("lexical", "dense"):
        count = report[f"only_in_{side}_count"]
        if count:
            ids = report[f"only_in_{side}"]
            shown = ", ".join(ids[:20]) + (" ..." if count > 20 else "")
            print(f"  only in {side} ({count}): {shown}")
    print("consistent" if report["consistent"] else "NOT consistent")
    return 0 if report["consistent"] else 1


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
    with httpx.Client(
        base_url=url, timeout=httpx.Timeout(30, read=3600), headers=auth_headers()
    ) as client:
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
    p_verify = sub.add_parser("verify", help="compare the two indexes of a collection")
    p_verify.add_argument("collection")
    for p in (p_ingest, p_ask, p_verify):
        p.add_argument("--url", default=default_url(), help="ragline's URL (env RAGLINE_URL)")
    for p in (p_ingest, p_ask):
        p.add_argument("--collection", default=None)
    evaluate.add_parser(sub)
    keys.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluate.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "verify":
        return verify(args.url, args.collection)
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
