"""Step 3 of the answer pipeline on real processes: which ranking orders the sources, and
the relevance cut-off that decides which of them are shown and put in the prompt
(gateway/ragline_gateway/ranking.py).

Gateways of this module's own on the session stack's retriever (the sample corpus in
`default`: one honeybee article among four unrelated ones) and a recording stand-in for
llm-svc that keeps every request body, so the prompt is known exactly. The reranker is
the session stack's (no cross-encoder: its bi-encoder fallback), or one of this module's
own on a tiny locally built cross-encoder (random weights: its order is compared, never
read as relevance).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.stack import Stack
from ragline_common.passages import parse_sources
from ragline_reranker.tiny import build_tiny_cross_encoder

from recording_llm import RecordingLlm, recording_llm
from service_helpers import Service, chat_events, event, gateway_env, metric, running_service

QUESTION = "How do honeybees tell each other where flowers are?"
BEES = "honeybee-waggle-dance.md"
SAMPLES = 5  # documents of the session stack's `default` collection, one chunk each
ANSWER = "They dance [1]."


def prompt_passages(recorder: RecordingLlm) -> list[tuple[int, str]]:
    """(n, title) of the passages in the last prompt sent to the model."""
    passages, question = parse_sources(recorder.bodies[-1]["messages"][-1]["content"])
    assert question == QUESTION
    return [(p.n, p.title) for p in passages]


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingLlm]:
    with recording_llm("recorder-llm", lambda body: [ANSWER]) as record:
        yield record


def _gateway(
    stack: Stack, recorder: RecordingLlm, log_dir: Path, name: str, **settings: str
) -> Any:
    env = gateway_env(
        stack.config, llm_url=recorder.url, allow_anonymous="true", cache_ttl_s="0",
        requests_per_minute="0", max_streams_per_key="0", **settings,
    )  # fmt: skip
    return running_service(name, "ragline_gateway", env, log_dir)


@pytest.fixture(scope="module")
def gw(
    stack: Stack, recorder: RecordingLlm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway with the default settings, on the session stack's reranker (no model)."""
    logs = tmp_path_factory.mktemp("gateway-ranking")
    with _gateway(stack, recorder, logs, "gateway-ranking") as svc:
        yield svc.url


def reranks(url: str) -> float:
    return metric(url, "http_requests_total", handler="/v1/rerank")


def ask(url: str, **fields: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events = chat_events(url, {"message": QUESTION, **fields})
    return event(events, "sources")["sources"], event(events, "done")


def test_without_a_cross_encoder_the_default_ranking_is_the_blend(
    gw: str, stack: Stack, recorder: RecordingLlm
) -> None:
    ready = httpx.get(f"{gw}/readyz", timeout=10).json()
    assert ready["ranking"] == {
        "in_use": "blend",
        "setting": "auto",
        "reranker_scorer": "bi-encoder",
        "cutoff": {"max_drop": 0.08, "min_score": None},
    }
    reranker = f"http://127.0.0.1:{stack.config.reranker_port}"
    before = reranks(reranker)
    sources, done = ask(gw, source_max_drop=None)  # all five, to see the whole order
    assert reranks(reranker) == before  # nothing is embedded again: no reranker call
    assert done["degraded"] == []
    assert len(sources) == SAMPLES
    assert sources[0]["doc_id"] == BEES
    scores = [s["score"] for s in sources]
    assert scores == sorted(scores, reverse=True)
    assert 0.5 < scores[0] <= 1.0  # w * BM25 / top BM25 + (1 - w) * cosine, the top one
    assert done["timings"]["rerank_ms"] < 100  # the ranking step took no model call


def test_the_cut_off_drops_far_below_sources_from_answer_and_prompt(
    gw: str, recorder: RecordingLlm
) -> None:
    sources, _ = ask(gw)
    assert [s["doc_id"] for s in sources] == [BEES]  # the four unrelated ones are cut
    assert [s["n"] for s in sources] == [1]
    # The prompt holds only the sources shown, numbered as shown.
    assert prompt_passages(recorder) == [(1, sources[0]["title"])]


def test_per_request_cut_off_on_the_native_api(gw: str, recorder: RecordingLlm) -> None:
    everything, _ = ask(gw, source_max_drop=None)  # the rule turned off: top_k sources
    assert len(everything) == SAMPLES
    assert [n for n, _ in prompt_passages(recorder)] == [1, 2, 3, 4, 5]

    # A drop just past the second source's keeps exactly two.
    gap = everything[0]["score"] - everything[1]["score"]
    two, _ = ask(gw, source_max_drop=gap + 0.001)
    assert [s["chunk_id"] for s in two] == [s["chunk_id"] for s in everything[:2]]
    assert len(prompt_passages(recorder)) == 2

    # An absolute floor above every score still keeps the top source.
    one, _ = ask(gw, source_max_drop=None, source_min_score=5.0)
    assert [s["doc_id"] for s in one] == [BEES]
    assert len(prompt_passages(recorder)) == 1

    # top_k still bounds what the cut-off keeps.
    three, _ = ask(gw, source_max_drop=None, top_k=3)
    assert len(three) == 3

    refused = httpx.post(
        f"{gw}/api/chat", json={"message": QUESTION, "source_max_drop": -0.1}, timeout=30
    )
    assert refused.status_code == 422


def test_per_request_cut_off_on_the_openai_api(gw: str, recorder: RecordingLlm) -> None:
    def complete(**fields: Any) -> list[dict[str, Any]]:
        body = {"model": "ragline", "messages": [{"role": "user", "content": QUESTION}],
                **fields}  # fmt: skip
        response = httpx.post(f"{gw}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["sources"]

    assert [s["doc_id"] for s in complete()] == [BEES]
    assert len(prompt_passages(recorder)) == 1
    assert len(complete(source_max_drop=None)) == SAMPLES
    assert len(prompt_passages(recorder)) == SAMPLES

    # Streamed: the first chunk carries the same sources.
    body = {"model": "ragline", "messages": [{"role": "user", "content": QUESTION}],
            "stream": True, "source_max_drop": 2.0}  # fmt: skip
    with httpx.stream("POST", f"{gw}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert len(orjson.loads(first[6:])["sources"]) == SAMPLES


@pytest.fixture(scope="module")
def cross_encoder_reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model")
    logs = tmp_path_factory.mktemp("reranker-ce-logs")
    env = {"RAGLINE_RERANKER_MODEL": str(model)}
    with running_service("reranker-ce", "ragline_reranker", env, logs) as svc:
        yield svc


def test_a_configured_cross_encoder_ranks_as_before(
    stack: Stack,
    recorder: RecordingLlm,
    cross_encoder_reranker: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    logs = tmp_path_factory.mktemp("gateway-ce")
    reranker = cross_encoder_reranker.url
    with _gateway(stack, recorder, logs, "gateway-ce", reranker_url=reranker) as svc:
        ready = httpx.get(f"{svc.url}/readyz", timeout=10).json()
        assert ready["ranking"] == {
            "in_use": "reranker",
            "setting": "auto",
            "reranker_scorer": "cross-encoder",
            "cutoff": {"max_drop": None, "min_score": None},  # none on the reranker's scale
        }
        before = reranks(reranker)
        sources, done = ask(svc.url)
        assert reranks(reranker) == before + 1
    assert done["degraded"] == []

    # The sources are the cross-encoder's top five of the retriever's candidates, in its
    # order and with its scores: as the gateway ranked before the blend existed.
    retriever = f"http://127.0.0.1:{stack.config.retriever_port}"
    found = httpx.post(
        f"{retriever}/v1/retrieve", json={"query": QUESTION, "top_k": 50}, timeout=30
    ).json()["hits"]
    ranked = httpx.post(
        f"{reranker}/v1/rerank",
        json={"query": QUESTION, "documents": [h["text"] for h in found], "top_n": 5},
        timeout=30,
    ).json()["results"]
    assert [s["chunk_id"] for s in sources] == [found[r["index"]]["chunk_id"] for r in ranked]
    assert [s["score"] for s in sources] == [round(r["relevance_score"], 6) for r in ranked]
    assert len(prompt_passages(recorder)) == len(ranked) == SAMPLES
