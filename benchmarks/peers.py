"""The relays gateway_bench.py's relay part compares the gateway with (`--peers`).

Two peers relay llm-svc's stream to the client, beside ragline's nginx + gateway:

- `nginx`: Debian's nginx as a bare reverse proxy straight to llm-svc's
  `/v1/chat/completions` (HTTP/1.1 keep-alive upstream, `proxy_buffering off`, no access
  log): what relaying a token costs when nothing is done to it, the floor of a relay. Run
  unprivileged like the stack's own nginx (`ragline_cli.processes.nginx_command`).
- `litellm`: LiteLLM's proxy (`litellm[proxy]`), a Python gateway people put in front of
  OpenAI-compatible servers, with one model routed to llm-svc and no database (no keys,
  no spend tracking), its logging and callbacks off. It lives in a venv of its own,
  `.venv-litellm` at the repository root (its pins are not the stack's), installed by uv
  only when `--peers` asks for it (a few hundred MB).

Both are started on free loopback ports beside a running BenchStack and stopped with it;
the client sends each the body the gateway sends llm-svc.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import time
from pathlib import Path
from string import Template

from ragline_cli.processes import ManagedProcess, http_ready, nginx_binary, nginx_command

REPO_ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = REPO_ROOT / ".venv-litellm"
LITELLM_PACKAGE = "litellm[proxy]"
# The interpreter the venv is made from: Debian's, as the other venvs of the repo.
LITELLM_BASE_PYTHON = "/usr/bin/python3.11"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 180  # LiteLLM imports for ~10 s on an idle core; the machine may be busy

NGINX_CONF = Template("""\
worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path ${prefix}/tmp/client_body;
    proxy_temp_path       ${prefix}/tmp/proxy;
    fastcgi_temp_path     ${prefix}/tmp/fastcgi;
    uwsgi_temp_path       ${prefix}/tmp/uwsgi;
    scgi_temp_path        ${prefix}/tmp/scgi;
    upstream llm { server 127.0.0.1:${llm_port}; keepalive 64; }
    server {
        listen 127.0.0.1:${port};
        location = /healthz { return 200 "ok\\n"; }
        location = /v1/chat/completions {
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }
    }
}
""")


def nginx_peer(port: int, llm_port: int, prefix: Path) -> ManagedProcess:
    """nginx relaying `/v1/chat/completions` on `port` to llm-svc, its files under `prefix`."""
    if nginx_binary() is None:
        raise SystemExit("nginx not installed (`make test` installs it)")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.substitute(prefix=prefix, port=port, llm_port=llm_port))
    return ManagedProcess("nginx-peer", nginx_command(prefix, conf), prefix / "nginx.out",
                          ready=http_ready(f"http://127.0.0.1:{port}/healthz"))  # fmt: skip


# --- LiteLLM ---------------------------------------------------------------------------------


def litellm_python() -> Path:
    return LITELLM_VENV / "bin" / "python"


def litellm_version() -> str | None:
    """The LiteLLM installed in `.venv-litellm`, or None (no venv, or no litellm in it)."""
    site = sorted(LITELLM_VENV.glob("lib/python*/site-packages"))
    if not site:
        return None
    found = list(importlib.metadata.distributions(name="litellm", path=[str(site[0])]))
    return found[0].version if found else None


def uv_binary() -> str | None:
    """uv on PATH, or the one scripts/uv.sh installs into `.venv-tools`."""
    found = shutil.which("uv")
    tools = REPO_ROOT / ".venv-tools" / "bin" / "uv"
    return found or (str(tools) if tools.exists() else None)


def install_litellm() -> tuple[float, str | None]:
    """Installs `litellm[proxy]` into `.venv-litellm` with uv (into an existing venv when
    one is there, so a failed install is tried again, not left half made). Returns the
    seconds it took and why it failed (None: it did not). The output goes to
    `.venv-litellm/install.log`."""
    uv = uv_binary()
    if uv is None:
        return 0.0, "uv not found (scripts/uv.sh installs it into .venv-tools)"
    started = time.perf_counter()
    # uv trusts the system CA store with UV_SYSTEM_CERTS (a TLS-intercepting proxy's CA).
    env = {**os.environ, "UV_SYSTEM_CERTS": "1"}
    steps = [[uv, "pip", "install", "--python", str(litellm_python()), LITELLM_PACKAGE]]
    if not litellm_python().exists():
        steps.insert(0, [uv, "venv", str(LITELLM_VENV), "--python", LITELLM_BASE_PYTHON])
    output = []
    for argv in steps:
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S, cwd=REPO_ROOT)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return time.perf_counter() - started, f"{' '.join(argv[:3])}: {exc}"
        output.append(done.stdout + done.stderr)
        if LITELLM_VENV.is_dir():
            (LITELLM_VENV / "install.log").write_text("".join(output))
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            return time.perf_counter() - started, f"{' '.join(argv[:3])} failed: " + " / ".join(
                tail
            )
    if litellm_version() is None:
        return time.perf_counter() - started, "installed, but no litellm in .venv-litellm"
    return time.perf_counter() - started, None


LITELLM_CONFIG = Template("""\
# LiteLLM's proxy for gateway_bench.py --peers: one model, llm-svc as an OpenAI-compatible
# upstream; no database, no keys; logging, callbacks and spend tracking off (the
# per-chunk success logging too, which LiteLLM calls "not recommended": it feeds spend
# tracking and callbacks, of which there are none here).
model_list:
  - model_name: ${model}
    litellm_params:
      model: openai/${model}
      api_base: http://127.0.0.1:${llm_port}/v1
      api_key: none
litellm_settings:
  turn_off_message_logging: true
  disable_streaming_logging: true
  success_callback: []
  failure_callback: []
  callbacks: []
router_settings:
  disable_cooldowns: true
general_settings:
  # No key: the gateway is measured with anonymous access too, and the client sends none.
  # (LiteLLM 1.108 refuses to start without a master key unless told this.)
  dangerously_permit_weak_or_unset_master_key: true
  disable_spend_logs: true
  disable_reset_budget: true
  background_health_checks: false
""")

# Its environment: the packaged model cost map (it fetches one from the network at import
# otherwise), no .env read from the working folder (LITELLM_MODE=DEV's default), errors
# only in its log. And no loop detection: the fixed engine sends the same word as every
# token, which LiteLLM takes for a model stuck in a loop at the 100th in a row (its
# REPEATED_STREAMING_CHUNK_LIMIT) and ends the stream with an error. The check is a
# counter per chunk, whatever its limit.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_LOG": "ERROR",
    "NUM_WORKERS": "1",
    "REPEATED_STREAMING_CHUNK_LIMIT": str(2**31 - 1),
}


def litellm_peer(port: int, llm_port: int, model: str, work: Path) -> ManagedProcess:
    """LiteLLM's proxy on `port` (one uvicorn worker, its default), routing `model` to
    llm-svc; its config and log in `work`, which is also its working folder (it puts
    that on sys.path)."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(LITELLM_CONFIG.substitute(model=model, llm_port=llm_port))
    argv = ["env", "-C", str(work), str(LITELLM_VENV / "bin" / "litellm"),
            "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    ready = http_ready(f"http://127.0.0.1:{port}/health/liveliness")
    return ManagedProcess("litellm", argv, work / "litellm.log", env=LITELLM_ENV, ready=ready)
