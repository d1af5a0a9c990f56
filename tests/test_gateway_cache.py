"""The answer cache, against a gateway of its own on the session stack's services and
Redis: a repeated question is answered from Redis without a generation, and a write to
the collection that could change the answer makes the cached one unreachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragline_cli.stack import Stack

from service_helpers import Service, chat_events, event, gateway_env, metric, running_service

COLLECTION = "cache_probe"
QUESTION = "How many moons does the planet Quillon have?"
FIRST = {"id": "quillon", "title": "Quillon", "text": "The planet Quillon has three moons."}
CORRECTION = {
    "id": "quillon-survey",
    "title": "Quillon survey",
    "text": "A new survey found that the planet Quillon has four moons, not three.",
}


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("cache")
    env = gateway_env(
        stack.config,
        allow_anonymous="true",
        default_collection=COLLECTION,
        requests_per_minute="0",
        max_tokens="40",
        # No relevance cut-off: both Quillon documents are sources, so that an answer made
        # after the survey was ingested shows it.
        blend_max_drop="off",
    )
    with running_service("gateway-cache", "ragline_gateway", env, tmp / "logs") as svc:
        ingest(svc.url, FIRST)
        yield svc


@pytest.fixture()
def generations(stack: Stack) -> Any:
    """How many chat completions llm-svc has served so far."""
    llm = f"http://127.0.0.1:{stack.config.llm_port}"
    return lambda: metric(llm, "http_requests_total", handler="/v1/chat/completions")


def ingest(url: str, doc: dict[str, str]) -> None:
    r = httpx.post(
        f"{url}/api/collections/{COLLECTION}/documents", json={"documents": [doc]}, timeout=60
    )
    assert r.status_code == 200, r.text


def answer(events: list[Any]) -> str:
    return "".join(e.data["text"] for e in events if e.name == "token")


def test_a_repeated_question_comes_from_the_cache(gateway: Service, generations: Any) -> None:
    first = chat_events(gateway.url, {"message": QUESTION})
    assert event(first, "done")["cached"] is False
    before = generations()

    start = time.perf_counter()
    # Case, spacing and the final question mark do not make it another question.
    again = chat_events(gateway.url, {"message": "  how many MOONS does the planet Quillon have"})
    elapsed = time.perf_counter() - start

    done = event(again, "done")
    assert done["cached"] is True
    assert done["degraded"] == []
    assert answer(again) == answer(first) and "three" in answer(again)
    assert event(again, "sources") == event(first, "sources")
    assert [e.name for e in again] == ["meta", "sources", "token", "done"]
    assert generations() == before  # llm-svc was not asked
    print(f"cached answer in {elapsed * 1000:.1f} ms (live: {done['timings']})")

    # Other filters or another top_k are other questions.
    other = chat_events(gateway.url, {"message": QUESTION, "top_k": 2})
    assert event(other, "done")["cached"] is False


def test_the_openai_endpoint_uses_the_same_cache(gateway: Service) -> None:
    body = {"model": "ragline", "messages": [{"role": "user", "content": "Quillon moons?"}]}
    responses = [
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60) for _ in range(2)
    ]
    assert [r.status_code for r in responses] == [200, 200]
    first, second = (r.json() for r in responses)
    assert first["ragline"]["cached"] is False and second["ragline"]["cached"] is True
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert second["sources"] == first["sources"]


def test_ingesting_a_document_that_changes_the_answer_invalidates_it(
    gateway: Service, generations: Any
) -> None:
    question = "How many moons does Quillon have, according to the documents?"
    chat_events(gateway.url, {"message": question})
    assert event(chat_events(gateway.url, {"message": question}), "done")["cached"] is True

    ingest(gateway.url, CORRECTION)
    before = generations()
    after = chat_events(gateway.url, {"message": question})
    assert event(after, "done")["cached"] is False
    assert generations() > before
    assert "quillon-survey" in {s["doc_id"] for s in event(after, "sources")["sources"]}

    # Deleting it is a write too: the answer is made again, without the survey.
    assert event(chat_events(gateway.url, {"message": question}), "done")["cached"] is True
    r = httpx.delete(
        f"{gateway.url}/api/collections/{COLLECTION}/documents/quillon-survey", timeout=60
    )
    assert r.status_code == 200, r.text
    gone = chat_events(gateway.url, {"message": question})
    assert event(gone, "done")["cached"] is False
    assert "quillon-survey" not in {s["doc_id"] for s in event(gone, "sources")["sources"]}


def test_follow_ups_are_not_cached(gateway: Service) -> None:
    conversation = {"conversation_id": "cache-follow-up"}
    chat_events(gateway.url, {"message": QUESTION, **conversation})
    follow_up = {"message": "And how big are they?", **conversation}
    for _ in range(2):
        done = event(chat_events(gateway.url, follow_up), "done")
        assert done["cached"] is False
        assert done["search_query"].endswith("And how big are they?")
