"""Start, watch and stop the local processes of the stack.

Used by `ragline up` and by the tests alike, so the tests exercise the same start-up path
a user runs. Readiness is polled with a deadline (never a fixed sleep); a process that
dies while starting fails at once with the tail of its log.

Each process runs in a session of its own. Stopping it ends the whole session, not only
the process itself: llm-svc on vLLM runs the engine in a child process (EngineCore), which
must not outlive it, and which is looked for and killed if it does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import httpx


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessFailed(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None
    proc: subprocess.Popen[bytes] | None = None
    # Whether what its session left behind was looked for since it ended (once is enough:
    # later, its pid may name someone else's session).
    swept: bool = False
    # When `terminate` sent SIGTERM to the process now running (monotonic; 0: not yet).
    terminated_at: float = 0.0

    def start(self) -> ManagedProcess:
        self.swept, self.terminated_at = False, 0.0
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches only the supervisor
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exit_code(self) -> int | None:
        """The exit status once it has ended (negative: the signal that ended it)."""
        return self.proc.poll() if self.proc is not None else None

    def is_ready(self) -> bool:
        """Alive and answering its readiness check (no check: alive is ready)."""
        return self.alive() and (self.ready is None or self.ready())

    def reap_group(self) -> None:
        """After the process itself has died: end what it left behind in its session
        (worker processes of a killed service would otherwise hold its port or files)."""
        if self.proc is None or self.proc.poll() is None or self.swept:
            return
        end_session(self.proc.pid, time.monotonic())
        self.swept = True

    def session_members(self) -> list[int]:
        """Live processes (zombies aside) of the session this process leads: itself and
        whatever it started that is still running, e.g. vLLM's engine process."""
        return [] if self.proc is None else session_members(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ready_by(self, deadline: float, timeout: float) -> bool:
        """One look while starting: True once ready. Raises ProcessFailed, with the tail
        of its log, when it has exited or `deadline` (monotonic) has passed."""
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise ProcessFailed(
                f"{self.name} exited with {code} while starting; log:\n{self.log_tail()}"
            )
        if self.ready is None or self.ready():
            return True
        if time.monotonic() >= deadline:
            raise ProcessFailed(
                f"{self.name} not ready after {timeout:.0f}s; log:\n{self.log_tail()}"
            )
        return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_by(deadline, timeout):
            time.sleep(0.1)

    def terminate(self) -> None:
        """SIGTERM to its process group, once, without waiting (`stop` waits): to stop
        several side by side."""
        if self.proc is None or self.proc.poll() is not None or self.terminated_at:
            return
        self.terminated_at = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM to its process group (unless `terminate` sent it); SIGKILL `timeout`
        after it. Then what is left of its session (children that outlived it, in its
        group or another) is ended too (`end_session`). Returns the pids of its session
        still alive after all that (empty, unless one could not be killed)."""
        if self.proc is None or self.swept:
            return []
        pid = self.proc.pid
        self.terminate()  # a second SIGTERM would make a service skip its clean shutdown
        deadline = (self.terminated_at or time.monotonic()) + timeout
        if self.proc.poll() is None:
            try:
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()  # then the rest of its session, at once (end_session)
                self.proc.wait(5)
        self.swept = True
        return end_session(pid, deadline)


def session_members(sid: int) -> list[int]:
    """Live processes (not zombies) whose session id is `sid`, from /proc (Linux; empty
    where /proc is not)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, pgrp, session.
        if fields[0] != b"Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


# How long what a stopped service left running in its session may take to exit by itself.
ORPHAN_GRACE_S = 2.0


def end_session(sid: int, deadline: float) -> list[int]:
    """After the leader of session `sid` has exited: what is left of the session (orphans,
    e.g. vLLM's worker, which lingered ~10 s after its parents) gets `ORPHAN_GRACE_S`, no
    later than `deadline`, to exit; then it is killed, multiprocessing's resource trackers
    last (they exit by themselves once the processes they watch are gone, and free the
    shared memory those left behind). The pids still alive after that."""
    grace = min(deadline, time.monotonic() + ORPHAN_GRACE_S)
    while (left := session_members(sid)) and time.monotonic() < grace:
        time.sleep(0.05)
    for last_too in (False, True):
        until = time.monotonic() + 5
        while left and time.monotonic() < until:
            for pid in left:
                if last_too or not _is_resource_tracker(pid):
                    _kill(pid)
            time.sleep(0.05)
            left = session_members(sid)
    return left


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def python_service(
    name: str,
    module: str,
    port: int,
    env: dict[str, str],
    log_dir: Path,
    python: Path | str | None = None,
) -> ManagedProcess:
    """One of the four services, run as `python -m MODULE` with its settings in `env`, by
    `python` (default: this interpreter; llm-svc on vLLM: the one of `.venv-vllm`)."""
    return ManagedProcess(
        name=name,
        argv=[str(python or sys.executable), "-m", module],
        env=env,
        log_path=log_dir / f"{name}.log",
        ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
    )


def redis_server(port: int, workdir: Path) -> ManagedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip

    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return ManagedProcess("redis", argv, workdir / "redis.log", ready=ping)


NGINX_TEMPLATE = Path(__file__).resolve().parents[2] / "nginx" / "nginx.conf.template"


def nginx(port: int, gateway: str, prefix: Path, web_root: Path) -> ManagedProcess:
    """The repo's nginx config, rendered into `prefix` and run unprivileged in the foreground."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = Template(NGINX_TEMPLATE.read_text()).substitute(
        prefix=prefix, listen=f"127.0.0.1:{port}", gateway=gateway, web_root=web_root
    )
    (prefix / "nginx.conf").write_text(conf)
    return ManagedProcess(
        "nginx",
        nginx_command(prefix, prefix / "nginx.conf"),
        prefix / "nginx.out",
        ready=http_ready(f"http://127.0.0.1:{port}/healthz"),
    )


def nginx_command(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with `conf`, its pid, logs and temp files under `prefix`.

    Started by root (CI, a container shell), nginx runs its workers as `nobody`, who may not
    write the temp folders under `prefix`: every request body past the 16k buffer failed
    with a 500. The workers run as whoever started the stack."""
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    return [
        nginx_binary() or "nginx", "-p", str(prefix), "-c", str(conf),
        "-e", str(prefix / "error.log"), "-g", directives,
    ]  # fmt: skip


def nginx_binary() -> str | None:
    """Debian puts nginx in /usr/sbin, which is not on a normal user's PATH."""
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
