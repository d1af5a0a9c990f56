"""Shared fixtures: the whole stack on free loopback ports, started once per test session.

It is the same `Stack` that `ragline up` runs, with the repo's sample corpus ingested
through nginx. nginx and redis-server are required (`make test` installs them); a test
session without them fails with that message instead of silently testing less.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ragline_cli.main import ingest
from ragline_cli.stack import REPO_ROOT, Stack, StackConfig

SAMPLES = REPO_ROOT / "samples"
# The offline engine's pace, so streams are visibly incremental (see test_end_to_end).
TOKEN_INTERVAL_MS = 20


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("stack")
    config = StackConfig.on_free_ports(
        base,
        {
            "llm": {"RAGLINE_LLM_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS)},
            # Most tests ask the same questions and need a live generation each time; the
            # cache and the limits are tested on gateways of their own (test_gateway_*).
            "gateway": {
                "RAGLINE_GATEWAY_CACHE_TTL_S": "0",
                "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0",
                "RAGLINE_GATEWAY_MAX_STREAMS_PER_KEY": "0",
            },
        },
    )
    missing = config.missing_binaries()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make test` (it installs them)")
    with Stack(config) as running:
        ingest(config.public_url, SAMPLES, "default")
        yield running


@pytest.fixture(scope="session")
def public_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.config.nginx_port}"


@pytest.fixture()
def client(public_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=public_url, timeout=httpx.Timeout(60.0)) as c:
        yield c
