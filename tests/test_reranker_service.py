"""reranker-svc against real processes on loopback: the bi-encoder default with the real
MiniLM weights, and cross-encoder mode on locally built random-weight cross-encoders
(mechanism only: their scores are compared, never read as relevance)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragline_gateway.clients.reranker import RerankerClient
from ragline_reranker.scorers import CrossEncoderScorer
from ragline_reranker.tiny import build_minilm_cross_encoder, build_tiny_cross_encoder

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
# Lengths out of order, and one document far past the model's 512 tokens.
MIXED = [
    UNRELATED[0],
    " ".join([RELEVANT] * 12),
    "short",
    " ".join(UNRELATED * 40),  # ~3,000 tokens, of which 512 are seen
    UNRELATED[4],
    " ".join(UNRELATED[:3]),
    RELEVANT,
]


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
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model"))


@pytest.fixture(scope="module")
def tiny_service(tiny_cross_encoder: str, log_dir: Path) -> Iterator[Service]:
    env = {"RAGLINE_RERANKER_MODEL": tiny_cross_encoder}
    with running_service("reranker-tiny", "ragline_reranker", env, log_dir) as svc:
        yield svc


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Service]:
    """MiniLM-sized cross-encoder (passes take a while on CPU) with a queue bound of 8."""
    path = build_minilm_cross_encoder(tmp_path_factory.mktemp("minilm-ce") / "model")
    env = {
        "RAGLINE_RERANKER_MODEL": str(path),
        "RAGLINE_RERANKER_MAX_BATCH_PAIRS": "8",
        "RAGLINE_RERANKER_MAX_QUEUE_PAIRS": "8",
    }
    with running_service("reranker-minilm-ce", "ragline_reranker", env, log_dir) as svc:
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

    statuses = [r.status_code for r in responses]
    assert statuses == [200] * n_requests, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["results"][0]["index"] == 0 for r in responses)
    assert pairs == n_requests * len(documents)
    print(f"{n_requests} concurrent requests served in {passes:.0f} forward passes")
    assert 1 <= passes < n_requests, f"{passes} forward passes for {n_requests} requests"
    assert metric(url, "ragline_rerank_queue_wait_seconds_count") >= n_requests


def test_many_concurrent_callers_never_get_a_5xx_and_batching_changes_no_score(
    reranker: Service,
) -> None:
    """16 callers x 20 requests at once on the default scorer (issue 14: a tokenizer shared
    by the tokenizer and model threads failed whole passes with 500). Documents of varied
    lengths, some past the model's 256 tokens (truncated); each pair's score must equal its
    score in a lone request, whatever pass it shared."""
    url = reranker.url
    words = " ".join([RELEVANT, *UNRELATED]).split()
    docs = [
        " ".join(words[(i * 7 + k) % len(words)] for k in range(n)) + f" #{i}"
        for i, n in enumerate((1, 2, 3, 5, 8, 12, 16, 25, 40, 300))
    ]
    queries = [QUERY, "Who invented basketball?", "How do plants make sugar?", "sonnet"]
    callers, rounds = 16, 20

    def request(caller: int, round_: int) -> tuple[str, list[str]]:
        start, n = (caller * 5 + round_) % len(docs), 1 + (caller + round_) % 3
        query = queries[(caller + round_) % len(queries)]
        return query, [docs[(start + k) % len(docs)] for k in range(n)]

    async def lone_scores() -> dict[tuple[str, str], float]:
        lone = {}
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for q in queries:
                for d in docs:
                    r = await client.post("/v1/rerank", json={"query": q, "documents": [d]})
                    assert r.status_code == 200, r.text
                    lone[(q, d)] = r.json()["results"][0]["relevance_score"]
        return lone

    async def storm() -> tuple[collections.Counter[int], list[str], float]:
        statuses: collections.Counter[int] = collections.Counter()
        failures: list[str] = []
        worst = 0.0

        async def caller(client: httpx.AsyncClient, c: int) -> None:
            nonlocal worst
            for r in range(rounds):
                query, documents = request(c, r)
                resp = await client.post(
                    "/v1/rerank", json={"query": query, "documents": documents}
                )
                statuses[resp.status_code] += 1
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code}: {resp.text[:200]}")
                    continue
                for x in resp.json()["results"]:
                    expected = lone[(query, documents[x["index"]])]
                    worst = max(worst, abs(x["relevance_score"] - expected))

        limits = httpx.Limits(max_connections=callers)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(caller(client, c) for c in range(callers)))
        return statuses, failures, worst

    lone = asyncio.run(lone_scores())
    passes_before = metric(url, "ragline_rerank_forward_passes_total")
    statuses, failures, worst = asyncio.run(storm())
    passes = metric(url, "ragline_rerank_forward_passes_total") - passes_before

    print(
        f"{callers * rounds} requests: {dict(statuses)}; {passes:.0f} forward passes; "
        f"largest score difference from a lone request {worst:.2e}"
    )
    assert statuses == {200: callers * rounds}, failures[:3]
    assert worst < 1e-4  # batching and padding change no score (float noise only)
    assert passes < callers * rounds  # requests really shared passes
    assert "forward pass failed" not in reranker.proc.log_path.read_text()


def test_cross_encoder_mode_is_reported(tiny_service: Service) -> None:
    ready = httpx.get(f"{tiny_service.url}/readyz", timeout=10).json()
    assert ready["scorer"] == "cross-encoder"
    assert ready["device"] == "cpu" and ready["dtype"] == "float32"
    assert ready["max_length"] == 512 and ready["tokenize_once"] is True
    assert "warning" not in ready


def test_cross_encoder_scores_match_one_by_one_in_the_callers_order(
    tiny_service: Service, tiny_cross_encoder: str
) -> None:
    """Pairs are sorted by length and truncated inside the service; each index must still
    carry the score of its own document, as scoring it alone gives."""
    scorer = CrossEncoderScorer(tiny_cross_encoder, device="cpu")
    expected = [scorer.forward(scorer.encode([(QUERY, d)]).features)[0] for d in MIXED]
    assert len({round(x, 4) for x in expected}) == len(MIXED)  # distinct: a swap would show

    r = httpx.post(
        f"{tiny_service.url}/v1/rerank",
        json={"query": QUERY, "documents": MIXED, "top_n": 100},  # above len: all come back
        timeout=30,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == list(range(len(MIXED)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    for x in results:
        assert x["relevance_score"] == pytest.approx(expected[x["index"]], abs=1e-5)

    padded = metric(tiny_service.url, "ragline_rerank_batch_tokens_sum", kind="padded")
    real = metric(tiny_service.url, "ragline_rerank_batch_tokens_sum", kind="real")
    assert padded >= real > 0
    assert metric(tiny_service.url, "ragline_rerank_flushes_total") >= 1


def test_gateway_client_speaks_the_rerank_shape(tiny_service: Service) -> None:
    direct = httpx.post(
        f"{tiny_service.url}/v1/rerank",
        json={"query": QUERY, "documents": MIXED, "top_n": 3},
        timeout=30,
    ).json()["results"]

    async def via_client() -> list[tuple[int, float]]:
        client = RerankerClient(tiny_service.url, pool_size=4, model="any-name")
        try:
            return await client.rerank(QUERY, MIXED, top_n=3, timeout=30)
        finally:
            await client.aclose()

    ranked = asyncio.run(via_client())
    assert [i for i, _ in ranked] == [x["index"] for x in direct]
    assert [s for _, s in ranked] == pytest.approx([x["relevance_score"] for x in direct])


def test_overload_past_queue_bound_is_503(slow_service: Service) -> None:
    url = slow_service.url
    long_docs = [" ".join([d] * 12) for d in [RELEVANT, *UNRELATED[:4], RELEVANT, *UNRELATED[:2]]]
    assert len(long_docs) == 8  # exactly the queue bound: one admitted request fills it

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
    assert metric(url, "ragline_rerank_requests_total", outcome="overloaded") >= len(rejected)

    # Once the queue drains the service answers again.
    r = post_until_ok(f"{url}/v1/rerank", {"query": QUERY, "documents": ["x"]}, within=30)
    assert r.status_code == 200
    assert metric(url, "ragline_rerank_queue_pairs") == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": QUERY, "documents": ["doc"] * 257}, "documents"),
        ({"query": QUERY, "documents": ["ok", 42]}, "documents.1"),
        ({"query": QUERY, "documents": ["ok", ""]}, "documents.1"),
        ({"query": QUERY, "documents": ["ok", None]}, "documents.1"),
        ({"query": QUERY, "documents": "one string"}, "documents"),
        ({"query": QUERY, "documents": ["x" * 20_001]}, "documents.0"),
        ({"query": "", "documents": ["doc"]}, "query"),
        ({"query": QUERY, "documents": ["doc"], "top_n": 0}, "top_n"),
        ({"query": QUERY, "documents": ["doc"], "top_n": -1}, "top_n"),
        ({"query": QUERY, "documents": ["doc"], "top_n": 257}, "top_n"),
        ({"documents": ["doc"]}, "query"),
    ],
    ids=[
        "empty-documents",
        "too-many",
        "non-string",
        "empty-string",
        "null-document",
        "documents-not-a-list",
        "document-too-long",
        "empty-query",
        "top-n-zero",
        "top-n-negative",
        "top-n-too-large",
        "no-query",
    ],
)
def test_bad_input_gets_the_error_envelope(url: str, payload: dict, field: str) -> None:
    r = httpx.post(f"{url}/v1/rerank", json=payload, timeout=10)
    assert_error(r, 422, "invalid_request")
    assert r.json()["error"]["message"].startswith(f"{field}:"), r.json()  # names the field
    # ...and the service still answers.
    ok = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": ["doc"]}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_is_400(url: str) -> None:
    r = post_malformed(f"{url}/v1/rerank", b'{"query": "x", "documents": [')
    assert_error(r, 400, "invalid_json")
    ok = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": ["doc"]}, timeout=30)
    assert ok.status_code == 200
