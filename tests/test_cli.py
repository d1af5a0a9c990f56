"""The `ragline` CLI (issue 14): which URL it talks to, a one-line error with exit code 2
when nothing answers there, and an ingest whose job polls back off and wait out 429/503.

URL precedence: --url > RAGLINE_URL > the URL a running stack recorded in run/stack.json
> http://127.0.0.1:8080. The polling tests run `ragline ingest` against a small counting
HTTP server of the test's own, so every request it makes is seen."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from ragline_cli import main as cli
from ragline_cli.processes import free_port
from ragline_cli.stack import Stack

RAGLINE = Path(sys.executable).with_name("ragline")
FALLBACK = "http://127.0.0.1:8080"


def run_cli(
    args: list[str], run_dir: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`ragline ARGS` as a user runs it, with RAGLINE_URL unset unless `env` sets it."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAGLINE_URL", "RAGLINE_API_KEY")}
    full_env.update({"RAGLINE_RUN_DIR": str(run_dir), **(env or {})})
    return subprocess.run(
        [str(RAGLINE), *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


def record_stack(run_dir: Path, url: str, pid: int, state: str = "running") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"pid": pid, "url": url, "state": state, "children": []}
    (run_dir / "stack.json").write_bytes(orjson.dumps(body))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_unreachable(result: subprocess.CompletedProcess, url: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"nothing answers at {url}" in lines[0] and "make up" in lines[0]


@pytest.mark.parametrize(
    "args",
    [["ask", "what is a waggle dance?"], ["ingest", "SAMPLES"], ["verify", "default"], ["status"]],
)
def test_nothing_answering_is_one_line_and_exit_code_2(args: list[str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = [str(cli.REPO_ROOT / "samples") if a == "SAMPLES" else a for a in args]
    assert_unreachable(run_cli([*args, "--url", url], tmp_path / "run"), url)


def test_url_precedence_and_help(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recorded = f"http://127.0.0.1:{free_port()}"
    from_env = f"http://127.0.0.1:{free_port()}"
    given = f"http://127.0.0.1:{free_port()}"

    # Nothing recorded, nothing set: the built-in default, shown in --help.
    assert FALLBACK in run_cli(["ask", "--help"], run_dir).stdout
    assert_unreachable(run_cli(["ask", "q"], run_dir), FALLBACK)

    # A running stack's recorded URL (its recorder, here this test, is alive).
    record_stack(run_dir, recorded, os.getpid())
    help_text = run_cli(["ask", "--help"], run_dir).stdout
    assert recorded in help_text and "stack.json" in help_text
    assert_unreachable(run_cli(["ask", "q"], run_dir), recorded)

    # RAGLINE_URL beats the recording, --url beats both.
    env = {"RAGLINE_URL": from_env}
    assert from_env in run_cli(["ingest", "--help"], run_dir, env).stdout
    assert_unreachable(run_cli(["ask", "q"], run_dir, env), from_env)
    assert_unreachable(run_cli(["ask", "q", "--url", given], run_dir, env), given)

    # A recording whose process has ended, or a stopped stack, is not a running stack.
    record_stack(run_dir, recorded, dead_pid())
    assert_unreachable(run_cli(["ask", "q"], run_dir), FALLBACK)
    record_stack(run_dir, recorded, os.getpid(), state="stopped")
    assert_unreachable(run_cli(["ask", "q"], run_dir), FALLBACK)


@pytest.mark.slow
def test_the_recorded_url_of_the_running_stack_is_used(stack: Stack) -> None:
    """The session stack records where it serves (nginx) in its run dir; with no URL
    given, `ask` and `status` find it there."""
    run_dir = stack.config.run_dir
    answer = run_cli(["ask", "How do honeybees tell each other where flowers are?"], run_dir)
    assert answer.returncode == 0, answer.stderr
    assert "[1]" in answer.stdout
    status = run_cli(["status"], run_dir)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{stack.config.public_url}: ready" in status.stdout
    for name in ("redis", "retriever", "reranker", "llm", "gateway", "nginx"):
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name))
        assert " up " in line, status.stdout


# Ingest polling, against a counting server.


@dataclass
class FakeRagline:
    """Jobs that end after `rounds_to_finish` list reads; the first answers to
    `GET /api/jobs` may be scripted refusals (status, Retry-After)."""

    rounds_to_finish: int = 6
    refusals: list[tuple[int, str]] = field(default_factory=list)
    jobs: dict[str, dict] = field(default_factory=dict)
    gets: list[tuple[float, str]] = field(default_factory=list)
    list_reads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_job(self, documents: int) -> dict:
        job_id = f"{len(self.jobs) + 1:032x}"
        job = {"job_id": job_id, "collection": "c", "status": "queued", "error": None,
               "documents": documents, "documents_done": 0, "chunks": 0}  # fmt: skip
        self.jobs[job_id] = job
        return job

    def listed(self) -> list[dict]:
        self.list_reads += 1
        for job in self.jobs.values():
            if self.list_reads >= self.rounds_to_finish:
                job.update(status="succeeded", documents_done=job["documents"], chunks=1)
            else:
                job["status"] = "running"
        return list(self.jobs.values())


@pytest.fixture()
def fake() -> Iterator[tuple[FakeRagline, str]]:
    state = FakeRagline()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with state.lock:
                if self.path.startswith("/api/collections/c/jobs"):
                    job = state.new_job(len(orjson.loads(body)["documents"]))
                else:
                    job = state.new_job(1)
                self.reply(202, job)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            with state.lock:
                state.gets.append((time.monotonic(), self.path))
                if parts.path == "/api/jobs":
                    assert parse_qs(parts.query)["collection"] == ["c"]
                    if state.refusals:
                        status, retry_after = state.refusals.pop(0)
                        error = {"error": {"code": "refused", "message": "later"}}
                        self.reply(status, error, {"retry-after": retry_after})
                        return
                    self.reply(200, {"jobs": state.listed()})
                else:
                    self.reply(200, state.jobs[parts.path.rsplit("/", 1)[1]])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Three jobs' worth: the text files in one job, each HTML file uploaded alone."""
    root = tmp_path / "docs"
    root.mkdir()
    for n in range(3):
        (root / f"note{n}.md").write_text(f"# Note {n}\n\nBees dance number {n}.\n")
    for n in range(2):
        (root / f"page{n}.html").write_text(f"<html><body><p>Page {n}</p></body></html>")
    return root


def test_ingest_polls_all_jobs_in_one_request_and_backs_off(
    fake: tuple[FakeRagline, str], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    assert cli.main(["ingest", str(folder), "--url", url, "--collection", "c"]) == 0
    assert "ingested 5 documents (3 chunks)" in capsys.readouterr().out
    assert len(state.jobs) == 3
    paths = [p for _, p in state.gets]
    # One list request per round for all three jobs, none per job.
    assert all(p.startswith("/api/jobs?") for p in paths), paths
    assert len(paths) == state.rounds_to_finish
    times = [t for t, _ in state.gets]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] < 0.6, gaps
    assert all(later >= earlier * 0.9 for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] > 2.5 * gaps[0], f"polls do not back off: {gaps}"


def test_ingest_waits_out_retry_after_on_429_and_503(
    fake: tuple[FakeRagline, str], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    state.rounds_to_finish = 2
    state.refusals = [(429, "1"), (503, "2")]
    assert cli.main(["ingest", str(folder), "--url", url, "--collection", "c"]) == 0
    assert "ingested 5 documents" in capsys.readouterr().out
    times = [t for t, _ in state.gets]
    assert len(times) == 4  # the 429, the 503, then two rounds
    assert times[1] - times[0] >= 0.95, "the 429's Retry-After was not waited out"
    assert times[2] - times[1] >= 1.95, "the 503's Retry-After was not waited out"
