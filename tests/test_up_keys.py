"""`ragline up` and API keys: anonymous only when nothing says otherwise.

The local stack runs without keys for convenience, but an operator who sets
`RAGLINE_GATEWAY_ALLOW_ANONYMOUS=false`, a keys file (`--keys`, or
`RAGLINE_GATEWAY_API_KEYS_FILE`) or keys in the environment gets a gateway that asks for
them: `ragline up` used to force anonymous mode whenever it had no keys file of its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ragline_cli.stack import REPO_ROOT, Stack, StackConfig

from service_helpers import write_keys

ENV_NAMES = (
    "RAGLINE_GATEWAY_ALLOW_ANONYMOUS",
    "RAGLINE_GATEWAY_API_KEYS_FILE",
    "RAGLINE_GATEWAY_API_KEYS",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_anonymous_only_when_nothing_asks_for_keys(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert StackConfig().anonymous
    assert not StackConfig(api_keys_file=tmp_path / "keys.json").anonymous
    clean_env.setenv("RAGLINE_GATEWAY_ALLOW_ANONYMOUS", "false")
    assert not StackConfig().anonymous
    clean_env.delenv("RAGLINE_GATEWAY_ALLOW_ANONYMOUS")
    clean_env.setenv("RAGLINE_GATEWAY_API_KEYS_FILE", str(tmp_path / "keys.json"))
    assert not StackConfig().anonymous
    clean_env.delenv("RAGLINE_GATEWAY_API_KEYS_FILE")
    clean_env.setenv("RAGLINE_GATEWAY_API_KEYS", '{"keys": []}')
    assert not StackConfig().anonymous


def test_up_refuses_a_keys_file_that_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ragline_cli.main", "up", "--keys", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "no such file" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_stack_with_a_keys_file_asks_for_a_key(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = write_keys(
        tmp_path / "keys.json",
        [{"id": "ops", "tenant": "t", "scopes": ["chat", "admin"], "collections": ["default"]}],
    )
    config = StackConfig.on_free_ports(tmp_path, {"llm": {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "1"}})
    config.api_keys_file = tmp_path / "keys.json"
    assert not config.anonymous
    with Stack(config):
        url = config.public_url
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        good = httpx.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {keys['ops']}"}, timeout=10
        )
        assert good.status_code == 200, good.text
        # Keys configured: the API's schema is not served (OPENAPI_DOCS=auto).
        docs = httpx.get(f"http://127.0.0.1:{config.gateway_port}/openapi.json", timeout=10)
        assert docs.status_code == 404


@pytest.mark.slow
def test_allow_anonymous_false_without_keys_does_not_start(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("RAGLINE_GATEWAY_ALLOW_ANONYMOUS", "false")
    config = StackConfig.on_free_ports(tmp_path, {})
    stack = Stack(config)
    with pytest.raises(Exception) as refused:
        stack.start()
    stack.stop()
    log = (config.run_dir / "logs" / "gateway.log").read_text()
    assert "gateway" in str(refused.value), refused.value
    assert "API keys" in log or "ALLOW_ANONYMOUS" in log, log[-2000:]
