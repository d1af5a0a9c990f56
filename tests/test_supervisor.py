"""The supervisor of `ragline up` (issue 14): a child that exits is restarted on the same
port with the same settings after a back-off, the rest of the stack keeps serving, and
only a crash loop stops everything, saying which child and where its log is.

The back-off rules are checked on cheap fake children (`python -c ...`) with a clock of
the test's own; the restart of a real service on a stack built like `make up`'s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from ragline_cli.main import ingest
from ragline_cli.processes import ManagedProcess, session_members
from ragline_cli.stack import Child, CrashLoop, RestartPolicy, Stack, StackConfig, Supervisor

from service_helpers import chat_events, event, poll

RAGLINE = Path(sys.executable).with_name("ragline")
BEE_NOTES = [
    "# Waggle dance\n\nHoneybees tell each other where flowers are with a waggle dance.\n",
    "# Foraging\n\nForager bees find flowers by scent and colour and come back to the hive.\n",
    "# Hive\n\nA hive keeps honey in wax cells; the queen lays the eggs.\n",
]


def fake_child(tmp_path: Path, name: str, code: str) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def children() -> Iterator[dict[str, Child]]:
    found: dict[str, Child] = {}
    yield found
    for child in found.values():
        child.proc.stop()


def test_restarts_with_doubling_backoff_then_gives_up_on_a_crash_loop(
    tmp_path: Path, children: dict[str, Child]
) -> None:
    proc = fake_child(tmp_path, "flaky", "import sys; print('bad setting'); sys.exit(3)")
    children["flaky"] = Child(proc.start(), "http://127.0.0.1:1")
    clock = Clock()
    events: list[str] = []
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=1.5, max_restarts=4)
    supervisor = Supervisor(children, policy, events.append, clock=clock)
    backoffs = []
    with pytest.raises(CrashLoop) as failed:
        for _ in range(50):
            poll(lambda: not proc.alive(), 10, "the fake child exits")
            supervisor.step()  # sees it exit: restart scheduled
            child = children["flaky"]
            assert child.state == "restarting"
            backoffs.append(child.restart_at - clock.now)
            clock.now += backoffs[-1] - 0.01
            supervisor.step()
            assert child.state == "restarting", "restarted before its back-off ran out"
            clock.now += 0.01
            supervisor.step()
            assert child.state == "starting"
    assert backoffs == [0.5, 1.0, 1.5, 1.5]  # doubling, capped at max_backoff_s
    assert failed.value.name == "flaky"
    message = str(failed.value)
    assert "exited with code 3" in message and str(proc.log_path) in message
    assert "crash loop" in message
    assert children["flaky"].restarts == 4
    assert children["flaky"].state == "down"
    # One line per event, each with the exit code and the log file, or the new pid.
    exits = [e for e in events if "exited with code 3" in e]
    assert len(exits) == 4 and all(str(proc.log_path) in e for e in exits)
    assert len([e for e in events if "restarted (pid" in e]) == 4
    assert proc.log_tail().count("bad setting") == 5  # the log is appended, not replaced


def test_backoff_starts_afresh_after_a_child_stayed_up(
    tmp_path: Path, children: dict[str, Child]
) -> None:
    proc = fake_child(tmp_path, "sleeper", "import time; time.sleep(120)")
    children["sleeper"] = Child(proc.start())
    clock = Clock()
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=10, reset_after_s=30)
    supervisor = Supervisor(children, policy, lambda _line: None, clock=clock)
    child = children["sleeper"]

    def crash_and_restart() -> float:
        supervisor.step()
        assert child.state == "up"
        os.kill(proc.pid, signal.SIGKILL)
        poll(lambda: not proc.alive(), 10, "the killed child is reaped")
        supervisor.step()
        assert child.state == "restarting" and child.last_exit_code == -signal.SIGKILL
        backoff = child.restart_at - clock.now
        clock.now = child.restart_at
        supervisor.step()
        assert child.state == "starting" and proc.alive()
        return backoff

    assert crash_and_restart() == 0.5
    assert crash_and_restart() == 1.0  # crashed again at once: twice as long
    assert crash_and_restart() == 2.0
    supervisor.step()
    clock.now += 31  # stayed up longer than reset_after_s
    assert crash_and_restart() == 0.5
    assert child.restarts == 4


def test_crash_loop_counts_only_restarts_within_the_window(
    tmp_path: Path, children: dict[str, Child]
) -> None:
    proc = fake_child(tmp_path, "slowflaky", "raise SystemExit(1)")
    children["slowflaky"] = Child(proc.start())
    clock = Clock()
    policy = RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.1, max_restarts=2, window_s=60)
    supervisor = Supervisor(children, policy, lambda _line: None, clock=clock)
    child = children["slowflaky"]
    for _ in range(6):  # a crash every 40 s: never more than 2 restarts within 60 s
        poll(lambda: not proc.alive(), 10, "the fake child exits")
        supervisor.step()
        clock.now = child.restart_at
        supervisor.step()
        assert child.state == "starting"
        clock.now += 40
    assert child.restarts == 6


def test_stopping_a_child_ends_its_whole_session(tmp_path: Path) -> None:
    """What a child started is stopped with it, even in a process group of its own and
    deaf to SIGTERM (as a stuck vLLM engine process would be): it is found in the child's
    session and killed once the stop's timeout has run out."""
    grandchild = (
        "import os, signal, time; os.setpgrp(); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    )
    code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(120)"
    )
    proc = fake_child(tmp_path, "parent", code).start()
    assert proc.pid is not None

    def stray() -> list[int]:  # the grandchild, once it is in a process group of its own
        return [pid for pid in proc.session_members() if os.getpgid(pid) != proc.pid]

    (pid,) = poll(stray, 30, "the grandchild runs in a group of its own")
    assert proc.stop(timeout=1.0) == []
    assert proc.session_members() == [] and pid not in session_members(proc.pid)


# A stack exactly like `make up`'s (nginx, redis, the four services), supervised.


def _cli(args: list[str], run_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAGLINE_URL"}
    env["RAGLINE_RUN_DIR"] = str(run_dir)
    return subprocess.run(
        [str(RAGLINE), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _stack_state(run_dir: Path) -> dict:
    return orjson.loads((run_dir / "stack.json").read_bytes())


def _child(run_dir: Path, name: str) -> dict:
    return next(c for c in _stack_state(run_dir)["children"] if c["name"] == name)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_supervised_stack_restarts_a_killed_reranker_and_stops_on_a_crash_loop(
    tmp_path: Path,
) -> None:
    config = StackConfig.on_free_ports(
        tmp_path,
        {
            "llm": {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "1"},
            # Every answer calls the reranker, so its outage shows in `degraded` (by default
            # a gateway does not call a reranker-svc that has no cross-encoder).
            "gateway": {"RAGLINE_GATEWAY_RANKING": "reranker"},
        },
    )
    missing = config.missing_binaries()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make test` (it installs them)")
    events: list[str] = []
    # A first back-off of 3 s keeps the outage open long enough to ask a question in it.
    policy = RestartPolicy(initial_backoff_s=3.0, max_backoff_s=3.0, max_restarts=2)
    stack = Stack(config, supervise=True, policy=policy, report=events.append)
    run_dir = config.run_dir
    with stack:
        url = config.public_url
        reranker = stack.processes["reranker"]
        reranker_url = f"http://127.0.0.1:{config.reranker_port}"
        first_pid = reranker.pid
        assert first_pid is not None
        docs = tmp_path / "docs"
        docs.mkdir()
        for n, text in enumerate(BEE_NOTES):
            (docs / f"bees{n}.md").write_text(text)
        ingest(url, docs, "default")

        status = _cli(["status"], run_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("redis", "retriever", "reranker", "llm", "gateway", "nginx"):
            line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name))
            assert " up " in line and " 0 " in line, status.stdout
        assert reranker_url in status.stdout and url in status.stdout

        os.kill(first_pid, signal.SIGKILL)
        # nginx and the gateway keep serving: the answer comes, without the reranker.
        events_during = chat_events(url, {"message": "How do honeybees find flowers?"})
        assert "rerank" in event(events_during, "done")["degraded"]
        during = _cli(["status"], run_dir)
        assert during.returncode == 1, during.stdout
        shown = next(ln for ln in during.stdout.splitlines() if ln.startswith("reranker"))
        assert any(s in shown for s in (" restarting ", " starting ", " down ")), shown

        poll(lambda: reranker.pid != first_pid and _ready(reranker_url), 120, "reranker back")
        assert any(
            "reranker exited with code -9" in e and str(reranker.log_path) in e for e in events
        ), events
        poll(lambda: _child(run_dir, "reranker")["state"] == "up", 10, "stack.json: up again")
        assert _child(run_dir, "reranker")["restarts"] == 1
        assert _child(run_dir, "reranker")["pid"] == reranker.pid

        def answered_normally() -> bool:
            done = event(chat_events(url, {"message": "What is a waggle dance?"}), "done")
            return "rerank" not in done["degraded"]

        poll(answered_normally, 30, "an answer reranked again", interval=0.5)

        # A reranker that cannot start any more (a bad setting): a crash loop.
        reranker.env["RAGLINE_RERANKER_DEVICE"] = "not-a-device"
        os.kill(reranker.pid, signal.SIGKILL)
        failure = stack.wait_failed(120)
        assert failure is not None, events
        assert failure.name == "reranker"
        assert "crash loop" in str(failure) and str(reranker.log_path) in str(failure)
        assert stack.dead() == list(stack.processes), "everything is stopped"
        state = _stack_state(run_dir)
        assert state["state"] == "failed" and "reranker" in state["failure"]
