"""The gateway's reranker client against vLLM's own rerank endpoint: another rerank server
stands in for reranker-svc with nothing but settings.

vLLM's CPU build serves a tiny random-weight cross-encoder (reranker-svc's test builder:
a 2-layer BERT with one label, head_dim 32) from `.venv-vllm`; where that venv is missing
the module is skipped with that reason. The scores are checked against sentence-
transformers' `CrossEncoder` on the same checkpoint, both in float32: vLLM applies a
sigmoid to a one-label classifier's logit, and so does `CrossEncoder` by default.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sentence_transformers import CrossEncoder

from ragline_cli.processes import ManagedProcess, free_port, http_ready
from ragline_cli.stack import REPO_ROOT
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.reranker import RerankerClient
from ragline_gateway.settings import GatewaySettings
from ragline_reranker.tiny import build_tiny_cross_encoder

from service_helpers import lower_session_priority
from vllm_helpers import run

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
MODEL_NAME = "tiny-ce"
TOL = 1e-4  # float32 on both sides; the same pairs, tokenizer and weights
QUERY = "what do tardigrades survive"
DOCUMENTS = [
    "Tardigrades survive vacuum, radiation and years without water.",
    "The stock market fell sharply today.",
    "Water bears are micro-animals found in moss.",
    "Cats sleep for most of the day.",
    "Boiling point of water at sea level is 100 degrees.",
    "A sonnet has fourteen lines.",
    "Tardigrades enter a tun state when dried out.",
    "Mosses grow on the north side of trees, mostly.",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"{VLLM_PYTHON} missing: build it with `scripts/bootstrap.sh --vllm` "
        "(make test does)",
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model")


@pytest.fixture(scope="module")
def vllm_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve`'s API server on a free port, ready when its /health answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--served-model-name", MODEL_NAME,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    ]  # fmt: skip
    proc = ManagedProcess(
        name="vllm-rerank",
        argv=argv,
        env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        },
        log_path=tmp_path_factory.mktemp("vllm-rerank-logs") / "vllm-rerank.log",
        ready=http_ready(f"{url}/health"),
    )
    proc.start()
    try:
        assert proc.proc is not None
        lower_session_priority(proc.proc.pid)
        proc.wait_ready(240)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[float]:
    """`CrossEncoder`'s scores for (QUERY, document), sigmoid applied, in document order."""
    model = CrossEncoder(str(model_dir), num_labels=1, device="cpu", local_files_only=True)
    assert isinstance(model.activation_fn, torch.nn.Sigmoid)  # its default for one label
    scores = model.predict([(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Sigmoid())
    out = [float(s) for s in scores]
    # The ranking is only well defined if no two scores are within the tolerance.
    ordered = sorted(out)
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 2 * TOL, out
    return out


def client_for(url: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> RerankerClient:
    """The client as the gateway builds it, from `RAGLINE_GATEWAY_RERANKER_*` settings."""
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_URL", url)
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_MODEL", MODEL_NAME)
    monkeypatch.setenv("RAGLINE_GATEWAY_RERANKER_HEALTH_PATH", "/health")
    for name, value in env.items():
        monkeypatch.setenv(f"RAGLINE_GATEWAY_RERANKER_{name.upper()}", value)
    return RerankerClient.from_settings(GatewaySettings(), pool_size=2)


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)


def test_scores_and_order_match_cross_encoder(
    vllm_url: str, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(vllm_url, monkeypatch)
    assert (client.api, client.path) == ("rerank", "/v1/rerank")
    ranked = run(client, client.rerank(QUERY, DOCUMENTS, top_n=len(DOCUMENTS), timeout=30))
    assert sorted(i for i, _ in ranked) == list(range(len(DOCUMENTS)))
    assert [i for i, _ in ranked] == best_first(expected)
    for index, score in ranked:
        assert score == pytest.approx(expected[index], abs=TOL), (index, score)


def test_top_n_is_honoured(
    vllm_url: str, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(vllm_url, monkeypatch)
    ranked = run(client, client.rerank(QUERY, DOCUMENTS, top_n=3, timeout=30))
    assert [i for i, _ in ranked] == best_first(expected)[:3]
    assert [s for _, s in ranked] == pytest.approx(sorted(expected, reverse=True)[:3], abs=TOL)


def test_split_requests_merge_into_one_ranking(
    vllm_url: str, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents spread over several vLLM requests rank as if sent in one."""
    client = client_for(vllm_url, monkeypatch, max_documents="3")
    assert client.max_documents == 3
    ranked = run(client, client.rerank(QUERY, DOCUMENTS, top_n=5, timeout=30))
    assert [i for i, _ in ranked] == best_first(expected)[:5]
    for index, score in ranked:
        assert score == pytest.approx(expected[index], abs=TOL), (index, score)


def test_readiness_probe_needs_the_health_path(
    vllm_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the gateway's /readyz calls: vLLM answers /health, not reranker-svc's /readyz."""
    client = client_for(vllm_url, monkeypatch)
    assert client.health_path == "/health"
    assert run(client, client.call("GET", client.health_path, 2.0)) == {}

    monkeypatch.delenv("RAGLINE_GATEWAY_RERANKER_HEALTH_PATH")
    default = RerankerClient.from_settings(GatewaySettings(), pool_size=1)
    assert default.health_path == "/readyz"
    with pytest.raises(UpstreamError) as failed:
        run(default, default.call("GET", default.health_path, 2.0))
    assert failed.value.status == 404
