"""`ragline`: run the local stack, ingest files, ask questions.

ragline up                   the whole stack in the foreground (Ctrl-C stops it all)
ragline status               each process of the local stack: pid, state, restarts, URL
ragline ingest PATH          a file or a folder of .md/.txt/.rst/.html/.pdf files
ragline ask "question"       stream an answer with its sources
ragline verify COLLECTION    compare the lexical and dense indexes of a collection
ragline eval DIR             retrieval quality on a BEIR-layout data set (in-process)
ragline eval DIR --answers   answer quality and TTFT of a running stack on that data set
ragline keys new ...         a new API key and its entry for the gateway's keys file

ingest, ask, verify, status and eval --answers talk to --url; without it, to RAGLINE_URL;
without that, to the URL a running `ragline up` recorded in run/stack.json; else
http://127.0.0.1:8080.
They send the API key in RAGLINE_API_KEY when it is set.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ragline_cli import evaluate, keys
from ragline_cli.documents import iter_documents, iter_uploads
from ragline_cli.stack import (
    REPO_ROOT,
    Stack,
    StackConfig,
    default_run_dir,
    pid_alive,
    read_state,
    running_url,
)

JOB_BATCH = 1000
JOB_BYTES = 16 * 1024 * 1024
FALLBACK_URL = "http://127.0.0.1:8080"
# Job polls start this often and slow down (x POLL_GROWTH each time) to POLL_MAX_S:
# every poll is a request that counts against the key's rate limit.
POLL_MIN_S = 0.2
POLL_MAX_S = 2.0
POLL_GROWTH = 1.5
# The most jobs one `GET /api/jobs` lists (the retriever's own bound).
JOBS_LIST_LIMIT = 1000
# Jobs missing from the list (older than the newest JOBS_LIST_LIMIT) polled one by one,
# at most this many per round.
SINGLE_POLLS_PER_ROUND = 10
# How long polls may fail to connect (a restart of the stack) before ingest gives up.
UNREACHABLE_GIVE_UP_S = 120.0
RETRY_AFTER_MAX_S = 60.0
# 503s with Retry-After waited out before the answer is taken as it is.
UNAVAILABLE_RETRIES = 10


class Unreachable(Exception):
    """Nothing answers at the URL (or the connection broke): one line, exit code 2."""


def default_url() -> tuple[str, str]:
    """The URL the CLI talks to without --url, and where it came from."""
    if os.environ.get("RAGLINE_URL"):
        return os.environ["RAGLINE_URL"], "env RAGLINE_URL"
    recorded = running_url()
    if recorded:
        return recorded, f"the running stack, {default_run_dir() / 'stack.json'}"
    return FALLBACK_URL, "built-in"


def auth_headers() -> dict[str, str]:
    key = os.environ.get("RAGLINE_API_KEY", "")
    return {"authorization": f"Bearer {key}"} if key else {}


def retry_after_s(response: httpx.Response, default: float = 1.0) -> float:
    """The response's Retry-After in seconds (delta-seconds or an HTTP date), capped."""
    value = response.headers.get("retry-after", "").strip()
    seconds = default
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = default
    return min(RETRY_AFTER_MAX_S, max(0.0, seconds))


def send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request, waiting out the key's rate limit (429 + Retry-After) as often as it
    takes, and a 503 that says when to come back (Retry-After) a few times: a big ingest
    is many requests, and a limit or a restarting service is no reason to give up."""
    unavailable = 0
    while True:
        response = client.request(method, url, **kwargs)
        if response.status_code == 429:
            time.sleep(retry_after_s(response))
            continue
        if (
            response.status_code == 503
            and "retry-after" in response.headers
            and unavailable < UNAVAILABLE_RETRIES
        ):
            unavailable += 1
            time.sleep(retry_after_s(response))
            continue
        return response


def _submitted(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise SystemExit(f"ingest failed ({response.status_code}): {response.text}")
    return response.json()


ENDED = ("succeeded", "failed", "cancelled")


class _Poller:
    """Reads the state of many jobs in as few requests as it can: one `GET /api/jobs`
    per collection per round (the newest JOBS_LIST_LIMIT jobs), and `GET /api/jobs/ID`
    only for a job that list does not show (or where the list route is unavailable)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.use_list = True

    def poll(self, pending: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The jobs of `pending` (by id) as the server has them now; a job not read this
        round is left out. Raises httpx.TransportError when nothing answers."""
        seen: dict[str, dict[str, Any]] = {}
        if self.use_list:
            collections = {j.get("collection") for j in pending.values()} - {None}
            for collection in sorted(collections):
                listed = self._list(collection, len(pending))
                if listed is None:
                    break
                seen.update({j["job_id"]: j for j in listed if j["job_id"] in pending})
        missing = [job_id for job_id in pending if job_id not in seen]
        for job_id in missing[:SINGLE_POLLS_PER_ROUND]:
            response = send(self.client, "GET", f"/api/jobs/{job_id}")
            if response.status_code >= 500:
                continue
            seen[job_id] = response.raise_for_status().json()
        return seen

    def _list(self, collection: str, count: int) -> list[dict[str, Any]] | None:
        params = {"collection": collection, "limit": min(JOBS_LIST_LIMIT, max(100, count))}
        response = send(self.client, "GET", "/api/jobs", params=params)
        if response.status_code in (404, 405):
            self.use_list = False  # a server without the list: one request per job
            return None
        if response.status_code != 200:
            return []  # for now: the missing jobs are polled one by one
        jobs = response.json().get("jobs")
        return jobs if isinstance(jobs, list) else []


def wait_for_jobs(client: httpx.Client, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Polls until every job has ended, showing progress on stderr; the ended jobs.

    Polls start POLL_MIN_S apart and slow down to POLL_MAX_S, each round one list
    request per collection; a 429 or 503 with Retry-After is waited out (`send`)."""
    latest = {j["job_id"]: j for j in jobs}
    total = sum(j["documents"] for j in jobs) or 1
    poller = _Poller(client)
    interval = POLL_MIN_S
    unreachable_since: float | None = None
    last = ""
    while True:
        pending = {k: j for k, j in latest.items() if j["status"] not in ENDED}
        if pending:
            try:
                latest.update(poller.poll(pending))
                unreachable_since = None
            except httpx.TransportError:
                # A restart or a blip: the jobs are durable, poll again, for a while.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > UNREACHABLE_GIVE_UP_S:
                    raise
        done = sum(j.get("documents_done", 0) for j in latest.values())
        line = f"\ringesting: {done}/{total} documents"
        if sys.stderr.isatty() and line != last:
            print(line, end="", file=sys.stderr, flush=True)
            last = line
        if all(j["status"] in ENDED for j in latest.values()):
            break
        time.sleep(interval)
        interval = min(POLL_MAX_S, interval * POLL_GROWTH)
    if last:
        print(file=sys.stderr)
    return [latest[j["job_id"]] for j in jobs]


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


def submit_documents(
    client: httpx.Client, docs: list[dict[str, Any]], collection: str
) -> list[dict[str, Any]]:
    """JSON documents as ingest jobs of up to JOB_BATCH each; the submitted jobs."""
    return [
        _submitted(
            send(client, "POST", f"/api/collections/{collection}/jobs", json={"documents": b})
        )
        for b in _batches(docs)
    ]


def finish_jobs(client: httpx.Client, jobs: list[dict[str, Any]]) -> tuple[int, int]:
    """Waits for every job; (documents, chunks) ingested, or exits on a failed job."""
    ended = wait_for_jobs(client, jobs)
    failed = [j for j in ended if j["status"] != "succeeded"]
    if failed:
        for job in failed:
            print(f"job {job['job_id']} {job['status']}: {job.get('error')}", file=sys.stderr)
        raise SystemExit(f"{len(failed)} of {len(ended)} ingest jobs did not succeed")
    return sum(j["documents"] for j in ended), sum(j["chunks"] for j in ended)


def ingest_documents(url: str, docs: list[dict[str, Any]], collection: str) -> tuple[int, int]:
    """Documents already read (`{"id", "title", "text", ...}`), ingested as `ingest` does."""
    with httpx.Client(base_url=url, timeout=600, headers=auth_headers()) as client:
        return finish_jobs(client, submit_documents(client, docs, collection))


def ingest(url: str, path: Path, collection: str) -> tuple[int, int]:
    """Text files go as JSON documents in jobs of up to JOB_BATCH; HTML and PDF files are
    uploaded for the retriever to parse. Waits for every job; exits on a failed one."""
    docs = list(iter_documents(path))
    uploads = list(iter_uploads(path))
    if not docs and not uploads:
        raise SystemExit(f"no .md/.txt/.rst/.html/.pdf files under {path}")
    root = path if path.is_dir() else path.parent
    with httpx.Client(base_url=url, timeout=600, headers=auth_headers()) as client:
        jobs = submit_documents(client, docs, collection)
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
        return finish_jobs(client, jobs)


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


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while the stack was starting (a model may load for minutes)."""


def up(
    no_ingest: bool,
    llm_engine: str | None = None,
    llm_model: str | None = None,
    reranker_model: str | None = None,
    keys: Path | None = None,
) -> int:
    """The stack in the foreground until Ctrl-C or SIGTERM. The engine and models: the
    flags, else the environment (RAGLINE_LLM_ENGINE, RAGLINE_LLM_VLLM_MODEL,
    RAGLINE_RERANKER_MODEL), else the extractive engine and no cross-encoder."""
    began = time.monotonic()
    extra: dict[str, dict[str, str]] = {"llm": {}, "reranker": {}}
    if llm_model:
        extra["llm"]["RAGLINE_LLM_VLLM_MODEL"] = _model_arg(llm_model)
        llm_engine = llm_engine or "vllm"
    if llm_engine:
        extra["llm"]["RAGLINE_LLM_ENGINE"] = llm_engine
    if reranker_model:
        extra["reranker"]["RAGLINE_RERANKER_MODEL"] = _model_arg(reranker_model)
    if keys is not None and not keys.is_file():
        print(f"ragline: --keys {keys}: no such file", file=sys.stderr)
        return 2
    config = StackConfig(
        extra_env={k: v for k, v in extra.items() if v},
        api_keys_file=keys.resolve() if keys is not None else None,
    )
    if config.llm_engine == "vllm" and config.llm_model and not config.vllm_installed:
        print(f"building {config.vllm_venv} for vLLM (once: ~1.5 min, 3.4 GB) ...", flush=True)
        built = subprocess.run([str(REPO_ROOT / "scripts" / "bootstrap.sh"), "--vllm"])
        if built.returncode != 0:
            print("ragline: building .venv-vllm failed (see above)", file=sys.stderr)
            return 1
    try:
        config.check_llm()
    except ValueError as exc:
        print(f"ragline: {exc}", file=sys.stderr)
        return 2
    stack = Stack(config, supervise=True, report=_say)
    phase = "starting"

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal phase
        if phase == "starting":
            phase = "stopping"
            raise _Interrupted()
        phase = "stopping"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"starting ragline (first start loads the embedding model; logs in {config.run_dir}/logs/)"
    )
    for line in config.describe():
        print(f"  {line}")
    sys.stdout.flush()
    try:
        stack.start()
        missing = config.missing_binaries()
        if missing:
            print(f"note: {' and '.join(missing)} not installed; running without (see README)")
        url = config.public_url
        if not no_ingest and not stack.failed.is_set():
            if config.anonymous or os.environ.get("RAGLINE_API_KEY"):
                docs, chunks = ingest(url, REPO_ROOT / "samples", "default")
                print(f"ingested {docs} sample documents ({chunks} chunks) into 'default'")
            else:
                print("the gateway has keys: samples not ingested (set RAGLINE_API_KEY to an "
                      "admin key of collection 'default' to have them)")  # fmt: skip
        if phase == "starting":
            phase = "running"
        if not stack.failed.is_set():
            took = f"started in {time.monotonic() - began:.1f} s"
            if "llm" in stack.ready_s and config.llm_model:
                took += f"; llm-svc ready after {stack.ready_s['llm']:.1f} s"
            print(f"\nragline is up: {url}  ({took}; state: {stack.state_path})")
            question = "How do honeybees tell each other where flowers are?"
            print(f'  try: .venv/bin/ragline ask --url {url} "{question}"')
            print("  .venv/bin/ragline status shows each process; Ctrl-C stops everything.")
            sys.stdout.flush()
        while phase == "running":
            failure = stack.wait_failed(0.5)
            if failure is not None:
                print(f"ragline stopped: {failure}", file=sys.stderr)
                return 1
        return 0
    except _Interrupted:
        return 130
    finally:
        phase = "stopping"
        print("stopping ragline ...", flush=True)
        stack.stop()
        if stack.leftovers:
            print(f"ragline: processes left running: {stack.leftovers}", file=sys.stderr)
        else:
            print("stopped; no process of the stack is left", flush=True)


def _model_arg(model: str) -> str:
    """A model flag: a path that exists here, made absolute (the services may run from
    another folder); anything else is a hub id, passed as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _say(line: str) -> None:
    print(f"ragline: {line}", file=sys.stderr, flush=True)


def _probe(name: str, url: str) -> bool:
    """Whether a child answers its readiness check now: redis PING, nginx /healthz (its
    own), a service /readyz."""
    parts = urlsplit(url)
    if parts.scheme == "redis":
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except (OSError, TypeError):
            return False
    check = "/healthz" if name == "nginx" else "/readyz"
    try:
        return httpx.get(f"{url.rstrip('/')}{check}", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def status(url: str) -> int:
    """The local stack as its supervisor recorded it, each child probed now; then whether
    `url` answers. 0: all up and ready; 1: something is down; 2: nothing answers."""
    state = read_state()
    code = 0
    if state is None:
        print(f"no stack state in {default_run_dir() / 'stack.json'} (is `make up` running?)")
    else:
        alive = pid_alive(state.get("pid"))
        what = state.get("state", "?")
        if not alive and what not in ("stopped", "failed"):
            what = "not running (the process that ran it has ended)"
        print(f"stack: {what}  (supervisor pid {state.get('pid')}, {state.get('url')})")
        if state.get("failure"):
            print(f"  {state['failure']}")
        rows = [("NAME", "PID", "STATE", "RESTARTS", "URL")]
        for child in state.get("children", []):
            recorded = child.get("state", "?")
            if not alive or not pid_alive(child.get("pid")):
                shown = "restarting" if alive and recorded == "restarting" else "down"
            elif recorded == "restarting":
                shown = "restarting"
            else:
                ok = _probe(child.get("name", ""), child.get("url", ""))
                shown = "up" if ok else ("starting" if recorded == "starting" else "not ready")
            if shown != "up":
                code = 1
            rows.append(
                (child.get("name", "?"), str(child.get("pid") or "-"), shown,
                 str(child.get("restarts", 0)), child.get("url", ""))
            )  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]))
    try:
        response = httpx.get(f"{url.rstrip('/')}/readyz", timeout=5.0)
    except httpx.TransportError as exc:
        raise Unreachable(url) from exc
    ready = response.status_code == 200
    print(f"{url}: {'ready' if ready else f'not ready ({response.status_code})'}")
    return code if ready else 1


def main(argv: list[str] | None = None) -> int:
    url_default, url_source = default_url()
    parser = argparse.ArgumentParser(
        prog="ragline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole stack in the foreground")
    p_up.add_argument("--no-ingest", action="store_true", help="do not ingest the sample corpus")
    p_up.add_argument(
        "--llm-engine",
        choices=("extractive", "vllm", "fixed"),
        default=None,
        help="llm-svc's engine (default: env RAGLINE_LLM_ENGINE, else extractive; "
        "--llm-model implies vllm)",
    )
    p_up.add_argument(
        "--llm-model",
        default=None,
        metavar="PATH_OR_ID",
        help="model for vLLM, run from .venv-vllm (built when missing); default: env "
        "RAGLINE_LLM_VLLM_MODEL. See docs/running-with-a-model.md",
    )
    p_up.add_argument(
        "--reranker-model",
        default=None,
        metavar="PATH_OR_ID",
        help="cross-encoder for reranker-svc (default: env RAGLINE_RERANKER_MODEL, else none)",
    )
    p_up.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="the gateway's API keys file (`ragline keys new`); default: env "
        "RAGLINE_GATEWAY_API_KEYS_FILE, else anonymous unless RAGLINE_GATEWAY_ALLOW_ANONYMOUS "
        "is set",
    )
    p_status = sub.add_parser("status", help="each process of the local stack, and the URL")
    p_ingest = sub.add_parser("ingest", help="ingest a file or a folder")
    p_ingest.add_argument("path", type=Path)
    p_ask = sub.add_parser("ask", help="ask a question and stream the answer")
    p_ask.add_argument("question")
    p_verify = sub.add_parser("verify", help="compare the two indexes of a collection")
    p_verify.add_argument("collection")
    for p in (p_ingest, p_ask, p_verify, p_status):
        p.add_argument(
            "--url",
            default=url_default,
            help=f"ragline's URL (default: %(default)s, from {url_source}; precedence: "
            "--url, env RAGLINE_URL, the URL a running `ragline up` recorded in "
            f"run/stack.json, {FALLBACK_URL})",
        )
    for p in (p_ingest, p_ask):
        p.add_argument("--collection", default=None)
    evaluate.add_parser(sub)
    keys.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluate.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "up":
        return up(args.no_ingest, args.llm_engine, args.llm_model, args.reranker_model, args.keys)
    if args.command == "ingest" and not args.path.exists():
        parser.error(f"{args.path} does not exist")
    try:
        return _remote(args)
    except (Unreachable, httpx.TransportError) as exc:
        print(_unreachable_line(args.url, exc), file=sys.stderr)
        return 2
    except httpx.HTTPStatusError as exc:
        print(f"ragline: {exc.response.status_code} from {exc.request.url}", file=sys.stderr)
        return 1


def _remote(args: argparse.Namespace) -> int:
    if args.command == "status":
        return status(args.url)
    if args.command == "verify":
        return verify(args.url, args.collection)
    if args.command == "ingest":
        docs, chunks = ingest(args.url, args.path, args.collection or "default")
        print(f"ingested {docs} documents ({chunks} chunks)")
        return 0
    return ask(args.url, args.question, args.collection)


def _unreachable_line(url: str, exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, Unreachable) else exc
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return f"ragline: nothing answers at {url}: is `make up` running? (or pass --url)"
    if isinstance(cause, httpx.TimeoutException):
        return f"ragline: {url} did not answer in time ({type(cause).__name__})"
    return f"ragline: lost the connection to {url}: {cause or type(cause).__name__}"


if __name__ == "__main__":
    sys.exit(main())
