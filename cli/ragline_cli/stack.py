"""The whole local stack: redis-server and nginx where installed, the four services.

`ragline up` runs it in the foreground; the end-to-end tests start the same `Stack` on
free ports. Services start together (their model loads overlap) and are waited for with
a deadline; stopping goes in reverse order.

With `supervise=True` a background thread watches the children once started, like a
process manager: a child that exits is started again (same command, port and settings)
after a back-off, while the others keep serving; only a crash loop stops the whole stack.
The stack's state (its URL, each child's pid, state and restarts) is kept in
`run/stack.json`, where `ragline status` and the CLI's URL default read it.

Generation runs on the engine `RAGLINE_LLM_ENGINE` names (in the environment, or the llm
settings of `StackConfig.extra_env`, which win): the extractive one from this venv, or
vLLM from `.venv-vllm` (its own venv, see llm-svc/README.md), on the model
`RAGLINE_LLM_VLLM_MODEL`. With vLLM's CPU build installed there, the stack fills in CPU
defaults the user did not set (`LLM_CPU_DEFAULTS`). A model can take minutes to load: the
stack waits for it up to `model_ready_timeout_s`, reporting every `progress_interval_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
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
# How long a child that is not ready yet gets to stop before it is killed.
STARTING_STOP_S = 3.0
# The services the gateway calls, started together and stopped together.
BACKENDS = ("retriever", "reranker", "llm")
VLLM_VENV = REPO_ROOT / ".venv-vllm"

# llm-svc on vLLM's CPU build, where the user set nothing else: a KV cache of 1 GiB
# (unsized, vLLM takes 90% of host RAM or refuses to start) and no torch.compile (starts
# in ~25 s instead of ~45 s). Either setting of a kind counts as set.
LLM_CPU_DEFAULTS: dict[tuple[str, ...], tuple[str, str]] = {
    ("RAGLINE_LLM_VLLM_KV_CACHE_GIB", "VLLM_CPU_KVCACHE_SPACE"): (
        "RAGLINE_LLM_VLLM_KV_CACHE_GIB",
        "1",
    ),
    ("RAGLINE_LLM_VLLM_ENFORCE_EAGER",): ("RAGLINE_LLM_VLLM_ENFORCE_EAGER", "true"),
}


def default_run_dir() -> Path:
    """run/ of the repo, or RAGLINE_RUN_DIR: where `ragline up` keeps its state and logs
    and where the CLI looks for the URL of a running stack."""
    return Path(os.environ.get("RAGLINE_RUN_DIR") or REPO_ROOT / "run")


def default_data_dir() -> Path:
    """data/ of the repo, or RAGLINE_DATA_DIR: the indexes of `ragline up`."""
    return Path(os.environ.get("RAGLINE_DATA_DIR") or REPO_ROOT / "data")


def vllm_build(venv: Path = VLLM_VENV) -> tuple[str, str] | None:
    """(package, version) of the vLLM installed in `venv`: `vllm-cpu` (CPU build) or
    `vllm` (the official CUDA build); None when there is none."""
    found = sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info"))
    for dist in found:
        name, _, version = dist.name.removesuffix(".dist-info").partition("-")
        if name in ("vllm", "vllm_cpu"):
            return name.replace("_", "-"), version
    return None


def is_local_model(model: str) -> bool:
    """A model given as a path (a folder on this machine), not as a hub id."""
    return bool(model) and Path(model).expanduser().exists()


def _env_port(name: str, default: int) -> int:
    return int(os.environ.get(f"RAGLINE_{name}_PORT", default))


@dataclass
class StackConfig:
    run_dir: Path = field(default_factory=default_run_dir)
    data_dir: Path = field(default_factory=default_data_dir)
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
    # A service that loads a model the user chose (llm-svc on vLLM, reranker-svc with a
    # cross-encoder) may take this long: a first start downloads it, a large one on a GPU
    # loads for minutes.
    model_ready_timeout_s: float = 1800.0
    # While services start, a line every this many seconds for each one not ready yet.
    progress_interval_s: float = 10.0
    # Where llm-svc on vLLM runs from (scripts/bootstrap.sh --vllm builds it).
    vllm_venv: Path = VLLM_VENV

    @property
    def anonymous(self) -> bool:
        """Whether the gateway runs without keys: only when neither a keys file (`--keys`,
        RAGLINE_GATEWAY_API_KEYS_FILE) nor keys (RAGLINE_GATEWAY_API_KEYS) are given and the
        environment does not set RAGLINE_GATEWAY_ALLOW_ANONYMOUS itself (`false` makes the
        gateway refuse to start without keys, as it would in production)."""
        if self.api_keys_file is not None:
            return False
        names = ("RAGLINE_GATEWAY_API_KEYS_FILE", "RAGLINE_GATEWAY_API_KEYS")
        if any(os.environ.get(name) for name in names):
            return False
        return "RAGLINE_GATEWAY_ALLOW_ANONYMOUS" not in os.environ

    def setting(self, service: str, name: str) -> str:
        """A service's setting as its process will see it: `extra_env` wins over the
        environment of this process; empty when neither sets it."""
        value = self.extra_env.get(service, {}).get(name)
        return value if value is not None else os.environ.get(name, "")

    @property
    def llm_engine(self) -> str:
        return self.setting("llm", "RAGLINE_LLM_ENGINE") or "extractive"

    @property
    def llm_model(self) -> str:
        """The vLLM model (id or path); empty for the other engines."""
        return self.setting("llm", "RAGLINE_LLM_VLLM_MODEL") if self.llm_engine == "vllm" else ""

    @property
    def reranker_model(self) -> str:
        """reranker-svc's cross-encoder (id or path); empty: none (the gateway ranks by
        its blend of BM25 and vector scores)."""
        return self.setting("reranker", "RAGLINE_RERANKER_MODEL")

    @property
    def vllm_python(self) -> Path:
        return self.vllm_venv / "bin" / "python"

    @property
    def vllm_installed(self) -> bool:
        """`.venv-vllm` is built (its stamp file is written last)."""
        return self.vllm_python.exists() and (self.vllm_venv / ".installed").exists()

    @property
    def llm_python(self) -> Path:
        return self.vllm_python if self.llm_engine == "vllm" else Path(sys.executable)

    def llm_defaults(self) -> dict[str, str]:
        """Settings the stack adds for llm-svc on vLLM, where the user set none: the CPU
        defaults on vLLM's CPU build, and no usage report to vLLM's authors."""
        if self.llm_engine != "vllm":
            return {}
        added = {}
        if not self.setting("llm", "VLLM_NO_USAGE_STATS"):
            added["VLLM_NO_USAGE_STATS"] = "1"
        build = vllm_build(self.vllm_venv)
        if build is not None and build[0] == "vllm-cpu":
            for names, (name, value) in LLM_CPU_DEFAULTS.items():
                if not any(self.setting("llm", n) for n in names):
                    added[name] = value
        return added

    def describe(self) -> list[str]:
        """What generates and what ranks, as `ragline up` prints it."""
        if self.llm_engine == "vllm":
            build = vllm_build(self.vllm_venv)
            on = f"{build[0]} {build[1]}" if build else "vLLM (not installed)"
            settings = {**{k: self.setting("llm", k) for k in self._llm_shown()},
                        **self.llm_defaults()}  # fmt: skip
            shown = ", ".join(
                f"{k.removeprefix('RAGLINE_LLM_VLLM_')}={v}"
                for k, v in settings.items()
                if v and k != "VLLM_NO_USAGE_STATS"
            )
            llm = f"vLLM, model {self.llm_model} ({on}, {self.vllm_python})"
            llm += f"; {shown}" if shown else ""
        elif self.llm_engine == "extractive":
            llm = "extractive (no model; RAGLINE_LLM_ENGINE=vllm runs one)"
        else:
            llm = self.llm_engine
        if self.reranker_model:
            rerank = f"cross-encoder {self.reranker_model} (reranker-svc)"
        else:
            rerank = "no cross-encoder (RAGLINE_RERANKER_MODEL unset): BM25 and vectors blended"
        return [f"generation: {llm}", f"ranking: {rerank}"]

    @staticmethod
    def _llm_shown() -> list[str]:
        return [
            "RAGLINE_LLM_VLLM_MAX_MODEL_LEN",
            "RAGLINE_LLM_VLLM_KV_CACHE_GIB",
            "RAGLINE_LLM_VLLM_GPU_MEMORY_UTILIZATION",
            "RAGLINE_LLM_VLLM_ENFORCE_EAGER",
            "RAGLINE_LLM_VLLM_MAX_NUM_SEQS",
        ]

    def check_llm(self) -> None:
        """Fails at once, saying what to do, when llm-svc on vLLM cannot start here."""
        if self.llm_engine != "vllm":
            return
        if not self.llm_model:
            raise ValueError(
                "RAGLINE_LLM_ENGINE=vllm needs a model: RAGLINE_LLM_VLLM_MODEL=PATH_OR_HUB_ID "
                "(or `ragline up --llm-model PATH_OR_HUB_ID`)"
            )
        if not self.vllm_installed:
            raise ValueError(
                f"llm-svc on vLLM runs from {self.vllm_venv}, which is not built: run "
                "`scripts/bootstrap.sh --vllm` (on a GPU host: VLLM_PACKAGE=vllm==0.32.0 "
                "scripts/bootstrap.sh --vllm), or `RAGLINE_LLM_ENGINE=vllm make up`, which "
                "builds it"
            )

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
        (see `Supervisor`); `report` gets its one-line events, `policy` its rules, and the
        progress lines while the services start."""
        self.config = config
        self.children: dict[str, Child] = {}
        self.supervisor = Supervisor(self.children, policy, report, self.write_state)
        self.progress: Callable[[str], None] = report or log.info
        # Seconds from launch to ready of each backend (retriever, reranker, llm).
        self.ready_s: dict[str, float] = {}
        # Processes of a child's session still alive after it was stopped, by child:
        # empty unless something could not be killed.
        self.leftovers: dict[str, list[int]] = {}
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

    def _service(
        self,
        name: str,
        module: str,
        port: int,
        env: dict[str, str],
        python: Path | None = None,
        model: str = "",
    ) -> ManagedProcess:
        """`model`: the model the service loads, when the user chose one. Given as a hub
        id, the service may download it (the stack otherwise runs offline, on what is
        in the Hugging Face cache); the environment's HF_HUB_OFFLINE still applies."""
        prefix = f"RAGLINE_{name.upper()}_"
        offline = {} if model and not is_local_model(model) else {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }  # fmt: skip
        full_env = {
            **offline,
            "TOKENIZERS_PARALLELISM": "false",
            f"{prefix}PORT": str(port),
            # Nothing load-balances a local stack: stop at once rather than drain.
            f"{prefix}SHUTDOWN_DRAIN_S": "0",
            **env,
            **self.config.extra_env.get(name, {}),
        }
        return python_service(
            name, module, port, full_env, self.config.run_dir / "logs", python=python
        )

    def start(self) -> Stack:
        c = self.config
        c.check_llm()
        c.run_dir.mkdir(parents=True, exist_ok=True)
        local = "http://127.0.0.1"
        try:
            if c.has_redis:
                redis = redis_server(c.redis_port, c.run_dir / "redis")
                self._launch(redis, f"redis://127.0.0.1:{c.redis_port}")
            backends = [
                self._service("retriever", "ragline_retriever", c.retriever_port,
                              {"RAGLINE_RETRIEVER_DATA_DIR": str(c.data_dir / "retriever")}),
                self._service("reranker", "ragline_reranker", c.reranker_port, {},
                              model=c.reranker_model),
                self._service("llm", "ragline_llm", c.llm_port, c.llm_defaults(),
                              python=c.llm_python, model=c.llm_model),
            ]  # fmt: skip
            ports = {"retriever": c.retriever_port, "reranker": c.reranker_port, "llm": c.llm_port}
            for proc in backends:
                self._launch(proc, f"{local}:{ports[proc.name]}", wait=False)
            self._wait_backends(backends)
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
            elif c.anonymous:
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

    def _loading(self, name: str) -> str:
        """What a starting backend is doing, for the progress lines."""
        c = self.config
        if name == "llm" and c.llm_model:
            return f"llm-svc: loading model {c.llm_model} (vLLM)"
        if name == "reranker" and c.reranker_model:
            return f"reranker-svc: loading model {c.reranker_model}"
        return f"{name}-svc: starting"

    def _timeout(self, name: str) -> float:
        c = self.config
        loads_model = (name == "llm" and c.llm_model) or (name == "reranker" and c.reranker_model)
        return max(c.ready_timeout_s, c.model_ready_timeout_s) if loads_model else c.ready_timeout_s

    def _wait_backends(self, procs: list[ManagedProcess]) -> None:
        """Until each is ready (they start side by side), each within its own timeout; a
        progress line every `progress_interval_s` for each not ready yet, and one when a
        model has loaded. `ready_s` records how long each took."""
        began = time.monotonic()
        pending = {p.name: p for p in procs}
        deadlines = {name: began + self._timeout(name) for name in pending}
        next_note = began + self.config.progress_interval_s
        while pending:
            for name, proc in list(pending.items()):
                if proc.ready_by(deadlines[name], self._timeout(name)):
                    del pending[name]
                    self.ready_s[name] = time.monotonic() - began
                    self._ready(name)
                    if "loading model" in self._loading(name):
                        what = self._loading(name).split(": ", 1)[0]
                        self.progress(f"{what}: model ready in {self.ready_s[name]:.1f} s")
            now = time.monotonic()
            if pending and now >= next_note:
                for name in pending:
                    self.progress(f"{self._loading(name)} … {now - began:.0f} s")
                next_note += self.config.progress_interval_s
            if pending:
                time.sleep(0.1)

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
        """In reverse order of start, so nginx stops taking requests first; the three
        backends, started side by side, are stopped side by side (llm-svc on vLLM takes
        seconds to end its engine processes)."""
        self.write_state()
        order = list(reversed(list(self.children.items())))
        for name, child in order:
            if name in BACKENDS:  # nginx and the gateway are down by now
                for other in (c for n, c in order if n in BACKENDS):
                    other.proc.terminate()
            began = time.monotonic()
            # One still starting has no request to finish; a model load does not heed
            # SIGTERM until it is done (uvicorn handles signals once its app started).
            left = child.proc.stop(STARTING_STOP_S if child.state == "starting" else 15.0)
            took = time.monotonic() - began
            if took > 5:
                self.progress(f"{name} took {took:.1f} s to stop")
            if left:
                self.leftovers[name] = left
                log.error("%s: processes %s of its session survived SIGKILL", name, left)
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
