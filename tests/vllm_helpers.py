"""What the tests on vLLM's CPU build share: its venv, the tiny Llama it serves, and a
stock `vllm serve` (vLLM's own OpenAI server) on a free port.

Only one vLLM should run at a time on the 2-core test machine: the fixtures that start one
are module-scoped, and pytest runs the modules one after another.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from ragline_cli.processes import ManagedProcess, free_port, http_ready
from ragline_cli.stack import REPO_ROOT

from service_helpers import lower_session_priority

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"

requires_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"{VLLM_PYTHON} missing: build it with `scripts/bootstrap.sh --vllm` (make test does)",
)

# vLLM's own settings for a quiet, small, offline engine on CPU.
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


@pytest.fixture(scope="module", name="tiny_llama")
def tiny_llama_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_llama`: tiny_models.build_tiny_llama, run by the venv that loads the model,
    so the files match its `transformers`. A test module uses it by importing
    `tiny_llama_fixture` (pytest finds it under its fixture name)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    script = Path(__file__).with_name("tiny_models.py")
    done = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@contextmanager
def stock_vllm(
    name: str, model_dir: Path, args: list[str], log_path: Path, ready_timeout: float = 240
) -> Iterator[tuple[str, ManagedProcess]]:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL_DIR ARGS` (what
    `vllm serve` runs) on a free loopback port, ready when its `/health` answers 200:
    (its URL, the process). On leaving, its whole session is ended (the API server, the
    engine core and the worker are three processes) and none may be left."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir), *args,
    ]  # fmt: skip
    proc = ManagedProcess(
        name=name, argv=argv, env=VLLM_ENV, log_path=log_path, ready=http_ready(f"{url}/health")
    )
    proc.start()
    try:
        assert proc.proc is not None
        lower_session_priority(proc.proc.pid)
        proc.wait_ready(ready_timeout)
        yield url, proc
    finally:
        left = proc.stop()
        assert not left, f"{name}: processes left after stopping it: {left}"


def stop_point(text: str) -> int:
    """Where a stop string taken from `text` ends it: the first two-letter alphanumeric run
    from the fifth character on that occurs nowhere earlier; `text[i : i + 2]` as `stop`
    makes the engine answer `text[:i]`."""
    return next(
        i
        for i in range(4, len(text) - 2)
        if text[i : i + 2].isalnum() and text.find(text[i : i + 2]) == i
    )


class Closable(Protocol):
    async def aclose(self) -> None: ...


def run(client: Closable, call: Awaitable[Any]) -> Any:
    """`call` (a gateway client's coroutine) on a loop of its own, the client closed after:
    its pool belongs to that loop."""

    async def go() -> Any:
        try:
            return await call
        finally:
            await client.aclose()

    return asyncio.run(go())
