"""The whole local stack: redis-server and nginx where installed, the four services.

`ragline up` runs it in the foreground; the end-to-end tests start the same `Stack` on
free ports. Services start together (their model loads overlap) and are waited for with
a deadline; stopping goes in reverse order.

With `supervise=True` a background thread watches the children once started, like a
process manager: a child that exits is started again (same command, port and settings)
after a back-off, while the others keep serving; only a crash loop stops the whole stack.
The stack's state (its URL, each child's pid, state and restarts) is kept in
`run/stack.json`, where `ragline status` and the CLI's URL default read it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ragline_cli.processes import (
    ManagedProcess,
    free_port,
    nginx,
    nginx_binary,
    python_service,
    redis_server,
)

log = logging.getLogger("ragline.stack")

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "stack.json"


def default_run_dir() -> Path:
    """run/ of the repo, or RAGLINE_RUN_DIR: where `ragline up` keeps its state and logs
    and where the CLI looks for the URL of a running stack."""
    return Path(os.environ.get("RAGLINE_RUN_DIR") or REPO_ROOT / "run")


def _env_port(name: str, default: int) -> int:
    return int(os.environ.get(f"RAGLINE_{name}_PORT", default))


@dataclass
class StackConfig:
    run_dir: Path = field(default_factory=default_run_dir)
    data_dir: Path = REPO_ROOT / "data"
    web_root: Path = REPO_ROOT / "web"
    nginx_port: int = field(default_factory=lambda: _env_port("NGINX", 8080))
    gateway_port: int = field(default_factory=lambda: _env_port("GATEWAY", 8000))
    retriever_port: int = field(default_factory=lambda: _env_port("RETRIEVER", 8001))
    reranker_port: int = field(default_factory=lambda: _env_port("RERANKER", 8002))
    llm_port: int = field(default_factory=lambda: _env_port("LLM", 8003))
    redis_port: int = field(default_factory=lambda: _env_port("REDIS", 6390))
    use_redis: bool = True
    use_nginx: bool = True
    # The gateway's API keys (JSON, see gateway/ragline_gateway/auth.py). None: a local
    # stack where every request is anonymous and may do everything (the gateway says so).
    api_keys_file: Path | None = None
    # Extra settings per service, e.g. {"llm": {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "5"}}.
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    ready_timeout_s: float = 180.0

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port if self.has_nginx else self.gateway_port}"

    @property
    def has_redis(self) -> bool:
        return self.use_redis and shutil.which("redis-server") is not None

    @property
    def has_nginx(self) -> bool:
        return self.use_nginx and nginx_binary() is not None

    @classmethod
    def on_free_ports(cls, base: Path, extra_env: dict[str, dict[str, str]]) -> StackConfig:
        """A throwaway stack under `base`, each server on a free loopback port (tests and
        benchmarks, beside whatever else runs on the machine)."""
        return cls(
            run_dir=base / "run",
            data_dir=base / "data",
            nginx_port=free_port(),
            gateway_port=free_port(),
            retriever_port=free_port(),
            reranker_port=free_port(),
            llm_port=free_port(),
            redis_port=free_port(),
            extra_env=extra_env,
        )

    def missing_binaries(self) -> list[str]:
        """The optional servers the stack will run without on this machine."""
        found = {"redis-server": self.has_redis, "nginx": self.has_nginx}
        return [name for name, ok in found.items() if not ok]


@dataclass(frozen=True)
class RestartPolicy:
    """When the supervisor starts an exited child again, and when it gives up.

    The first restart comes after `initial_backoff_s`, each further one waits twice as
    long up to `max_backoff_s`; a child that has stayed up for `reset_after_s` starts
    again from `initial_backoff_s`. A child that would need more than `max_restarts`
    restarts within `window_s` is in a crash loop: the whole stack stops."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    reset_after_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0
    # How often the supervisor looks at its children.
    interval_s: float = 0.1


class CrashLoop(RuntimeError):
    """A child kept exiting: the supervisor gave up on the stack."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class Child:
    """What the supervisor knows of one child besides its process."""

    proc: ManagedProcess
    url: str = ""
    # starting (launched, not yet ready), up, restarting (waiting out its back-off),
    # down (stopped, or given up on)
    state: str = "starting"
    restarts: int = 0
    last_exit_code: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    backoff_s: float = 0.0
    restart_at: float = 0.0
    recent: deque[float] = field(default_factory=deque)


class Supervisor:
    """Restarts exited children with back-off; `step()` is one look at all of them.

    Each event is one line passed to `report` (by default the `ragline.stack` logger),
    naming the child, its exit code and its log file. `step()` raises `CrashLoop` when a
    child exits once more after `policy.max_restarts` restarts within `policy.window_s`.
    """

    def __init__(
        self,
        children: dict[str, Child],
        policy: RestartPolicy | None = None,
        report: Callable[[str], None] | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self.policy = policy or RestartPolicy()
        self.report = report or log.warning
        self.on_change = on_change or (lambda: None)
        self.clock = clock

    def step(self) -> None:
        changed = False
        for name, child in list(self.children.items()):
            changed |= self._look_at(name, child)
        if changed:
            self.on_change()

    def _look_at(self, name: str, child: Child) -> bool:
        policy, now, proc = self.policy, self.clock(), child.proc
        if child.state in ("starting", "up") and not proc.alive():
            proc.reap_group()
            child.last_exit_code = proc.exit_code
            while child.recent and now - child.recent[0] > policy.window_s:
                child.recent.popleft()
            where = f"exited with code {child.last_exit_code}; log: {proc.log_path}"
            if len(child.recent) >= policy.max_restarts:
                child.state = "down"
                raise CrashLoop(
                    name,
                    f"{name} {where}; it was restarted {len(child.recent)} times within "
                    f"{policy.window_s:.0f}s: giving up (crash loop), stopping everything",
                )
            if child.state == "up" and now - child.started_at >= policy.reset_after_s:
                child.backoff_s = 0.0  # it had stayed up a good while: start afresh
            child.backoff_s = (
                min(policy.max_backoff_s, child.backoff_s * 2)
                if child.backoff_s
                else policy.initial_backoff_s
            )
            child.state = "restarting"
            child.restart_at = now + child.backoff_s
            self.report(f"{name} {where}; restarting in {child.backoff_s:g}s")
            return True
        if child.state == "restarting" and now >= child.restart_at:
            proc.start()
            child.restarts += 1
            child.recent.append(now)
            child.started_at = now
            child.state = "starting"
            self.report(f"{name} restarted (pid {proc.pid}, restart {child.restarts})")
            return True
        if child.state == "starting" and proc.is_ready():
            child.state = "up"
            if child.restarts:
                self.report(f"{name} is up again (pid {proc.pid})")
            return True
        return False


class Stack:
    def __init__(
        self,
        config: StackConfig,
        supervise: bool = False,
        policy: RestartPolicy | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        """`supervise`: once started, restart exited children in a background thread
        (see `Supervisor`); `report` gets its one-line events, `policy` its rules."""
        self.config = config
        self.children: dict[str, Child] = {}
        self.supervisor = Supervisor(self.children, policy, report, self.write_state)
        self.supervising = supervise
        # Set when the supervisor gave up; `failure` says why.
        self.failed = threading.Event()
        self.failure: CrashLoop | None = None
        self._state = "starting"
        self._started_wall = time.time()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def processes(self) -> dict[str, ManagedProcess]:
        """Each child's current process, in start order (replace one with `restart`)."""
        return {name: child.proc for name, child in self.children.items()}

    @property
    def state_path(self) -> Path:
        return self.config.run_dir / STATE_FILE

    def _service(self, name: str, module: str, port: int, env: dict[str, str]) -> ManagedProcess:
        prefix = f"RAGLINE_{name.upper()}_"
        full_env = {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            f"{prefix}PORT": str(port),
            # Nothing load-balances a local stack: stop at once rather than drain.
            f"{prefix}SHUTDOWN_DRAIN_S": "0",
            **env,
            **self.config.extra_env.get(name, {}),
        }
        return python_service(name, module, port, full_env, self.config.run_dir / "logs")

    def start(self) -> Stack:
        c = self.config
        c.run_dir.mkdir(parents=True, exist_ok=True)
        local = "http://127.0.0.1"
        try:
            if c.has_redis:
                redis = redis_server(c.redis_port, c.run_dir / "redis")
                self._launch(redis, f"redis://127.0.0.1:{c.redis_port}")
            backends = [
                self._service("retriever", "ragline_retriever", c.retriever_port,
                              {"RAGLINE_RETRIEVER_DATA_DIR": str(c.data_dir / "retriever")}),
                self._service("reranker", "ragline_reranker", c.reranker_port, {}),
                self._service("llm", "ragline_llm", c.llm_port, {}),
            ]  # fmt: skip
            ports = {"retriever": c.retriever_port, "reranker": c.reranker_port, "llm": c.llm_port}
            for proc in backends:
                self._launch(proc, f"{local}:{ports[proc.name]}", wait=False)
            for proc in backends:
                proc.wait_ready(c.ready_timeout_s)
                self._ready(proc.name)
            gateway_env = {
                "RAGLINE_GATEWAY_RETRIEVER_URL": f"{local}:{c.retriever_port}",
                "RAGLINE_GATEWAY_RERANKER_URL": f"{local}:{c.reranker_port}",
                "RAGLINE_GATEWAY_LLM_URL": f"{local}:{c.llm_port}",
                "RAGLINE_GATEWAY_REDIS_URL": (
                    f"redis://127.0.0.1:{c.redis_port}/0" if c.has_redis else ""
                ),
            }
            if c.api_keys_file is not None:
                gateway_env["RAGLINE_GATEWAY_API_KEYS_FILE"] = str(c.api_keys_file)
            else:
                gateway_env["RAGLINE_GATEWAY_ALLOW_ANONYMOUS"] = "true"
            gateway_proc = self._service("gateway", "ragline_gateway", c.gateway_port, gateway_env)
            self._launch(gateway_proc, f"{local}:{c.gateway_port}")
            if c.has_nginx:
                prefix = c.run_dir / "nginx"
                gateway = f"127.0.0.1:{c.gateway_port}"
                self._launch(nginx(c.nginx_port, gateway, prefix, c.web_root), c.public_url)
        except BaseException:
            self.stop()
            raise
        self._state = "running"
        self.write_state()
        if self.supervising:
            self._thread = threading.Thread(
                target=self._supervise, name="ragline-supervisor", daemon=True
            )
            self._thread.start()
        return self

    def _launch(self, proc: ManagedProcess, url: str, wait: bool = True) -> None:
        self.children[proc.name] = Child(proc.start(), url)
        self.write_state()
        if wait:
            proc.wait_ready(self.config.ready_timeout_s)
            self._ready(proc.name)

    def _ready(self, name: str) -> None:
        self.children[name].state = "up"
        self.write_state()

    def restart(self, name: str, env: dict[str, str] | None = None) -> ManagedProcess:
        """Stops the child `name` and starts it again with `env` added to its settings
        (same command and port), waiting until it is ready; the supervisor, if running,
        watches the new process. Returns it."""
        with self._lock:
            child = self.children[name]
            old = child.proc
            old.stop()
            new = dataclasses.replace(old, env={**old.env, **(env or {})}, proc=None).start()
            child.proc, child.state, child.started_at = new, "starting", time.monotonic()
            self.write_state()
        new.wait_ready(self.config.ready_timeout_s)
        return new

    def _supervise(self) -> None:
        while not self._halt.wait(self.supervisor.policy.interval_s):
            with self._lock:
                if self._halt.is_set():
                    return
                try:
                    self.supervisor.step()
                except CrashLoop as exc:
                    self.failure = exc
                    self._state = "failed"
                    self.supervisor.report(str(exc))
                    self._stop_children()
                    self.failed.set()
                    return
                except Exception:  # a bug here must not leave the stack unwatched
                    log.exception("supervisor step failed")

    def wait_failed(self, timeout: float | None = None) -> CrashLoop | None:
        """Waits up to `timeout` for the supervisor to give up; why it did, or None."""
        self.failed.wait(timeout)
        return self.failure

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._state not in ("failed", "stopped"):
                self._state = "stopping"
            self._stop_children()

    def _stop_children(self) -> None:
        """In reverse order of start, so nginx stops taking requests first."""
        self.write_state()
        for child in reversed(list(self.children.values())):
            child.proc.stop()
            child.state = "down"
        if self._state != "failed":
            self._state = "stopped"
        self.write_state()

    def dead(self) -> list[str]:
        return [name for name, proc in self.processes.items() if not proc.alive()]

    def status(self) -> dict[str, Any]:
        """What run/stack.json holds: the stack's URL and state, and each child's."""
        return {
            "pid": os.getpid(),
            "url": self.config.public_url,
            "state": self._state,
            "supervised": self.supervising,
            "failure": str(self.failure) if self.failure else None,
            "started_at": self._started_wall,
            "updated_at": time.time(),
            "run_dir": str(self.config.run_dir),
            "children": [
                {
                    "name": name,
                    "pid": child.proc.pid,
                    "state": child.state,
                    "restarts": child.restarts,
                    "exit_code": child.last_exit_code,
                    "url": child.url,
                    "log": str(child.proc.log_path),
                }
                for name, child in self.children.items()
            ],
        }

    def write_state(self) -> None:
        """run/stack.json, replaced whole, so a reader never sees half of it."""
        path = self.state_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(self.status(), option=orjson.OPT_INDENT_2))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_state(run_dir: Path | None = None) -> dict[str, Any] | None:
    """The state a stack recorded in `run_dir` (default: `default_run_dir()`), or None."""
    path = (run_dir or default_run_dir()) / STATE_FILE
    try:
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_url(run_dir: Path | None = None) -> str | None:
    """The URL a running `ragline up` (or test stack) serves, as it recorded it; None when
    none is recorded or the process that recorded it has ended."""
    state = read_state(run_dir)
    if not state or state.get("state") not in ("starting", "running"):
        return None
    if not pid_alive(state.get("pid")) or not isinstance(state.get("url"), str):
        return None
    return state["url"]
