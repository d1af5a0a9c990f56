"""The whole local stack: redis-server and nginx where installed, the four services.

`ragline up` runs it in the foreground; the end-to-end tests start the same `Stack` on
free ports. Services start together (their model loads overlap) and are waited for with
a deadline; stopping goes in reverse order.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

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


def _env_port(name: str, default: int) -> int:
    return int(os.environ.get(f"RAGLINE_{name}_PORT", default))


@dataclass
class StackConfig:
    run_dir: Path = REPO_ROOT / "run"
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


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.processes: dict[str, ManagedProcess] = {}

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
        try:
            if c.has_redis:
                self._launch(redis_server(c.redis_port, c.run_dir / "redis"))
            backends = [
                self._service("retriever", "ragline_retriever", c.retriever_port,
                              {"RAGLINE_RETRIEVER_DATA_DIR": str(c.data_dir / "retriever")}),
                self._service("reranker", "ragline_reranker", c.reranker_port, {}),
                self._service("llm", "ragline_llm", c.llm_port, {}),
            ]  # fmt: skip
            for proc in backends:
                self._launch(proc, wait=False)
            for proc in backends:
                proc.wait_ready(c.ready_timeout_s)
            gateway_env = {
                "RAGLINE_GATEWAY_RETRIEVER_URL": f"http://127.0.0.1:{c.retriever_port}",
                "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{c.reranker_port}",
                "RAGLINE_GATEWAY_LLM_URL": f"http://127.0.0.1:{c.llm_port}",
                "RAGLINE_GATEWAY_REDIS_URL": (
                    f"redis://127.0.0.1:{c.redis_port}/0" if c.has_redis else ""
                ),
            }
            if c.api_keys_file is not None:
                gateway_env["RAGLINE_GATEWAY_API_KEYS_FILE"] = str(c.api_keys_file)
            else:
                gateway_env["RAGLINE_GATEWAY_ALLOW_ANONYMOUS"] = "true"
            self._launch(self._service("gateway", "ragline_gateway", c.gateway_port, gateway_env))
            if c.has_nginx:
                prefix = c.run_dir / "nginx"
                gateway = f"127.0.0.1:{c.gateway_port}"
                self._launch(nginx(c.nginx_port, gateway, prefix, c.web_root))
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, proc: ManagedProcess, wait: bool = True) -> None:
        self.processes[proc.name] = proc.start()
        if wait:
            proc.wait_ready(self.config.ready_timeout_s)

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()

    def dead(self) -> list[str]:
        return [name for name, proc in self.processes.items() if not proc.alive()]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
