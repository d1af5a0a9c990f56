"""Follow-up questions rewritten by llm-svc (`query_rewrite=llm`) before retrieval, and
the fallback to concatenation when the rewrite fails; gateways of their own on the
session stack's services and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from ragline_cli.stack import Stack

from service_helpers import Service, chat_events, event, gateway_env, metric, running_service

QUESTION = "How do honeybees tell each other where flowers are?"
FOLLOW_UP = "How far away can they be?"


def rewriting_gateway(
    stack: Stack, name: str, log_dir: Path, **settings: str
) -> AbstractContextManager[Service]:
    env = gateway_env(
        stack.config, allow_anonymous="true", query_rewrite="llm", cache_ttl_s="0",
        requests_per_minute="0", max_tokens="16", **settings,
    )  # fmt: skip
    return running_service(name, "ragline_gateway", env, log_dir)


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with rewriting_gateway(stack, "gateway-rewrite", tmp_path_factory.mktemp("rw")) as svc:
        yield svc


def test_a_follow_up_is_rewritten_by_the_llm(gateway: Service, stack: Stack) -> None:
    llm = f"http://127.0.0.1:{stack.config.llm_port}"
    conversation = {"conversation_id": "rewrite-by-llm"}
    first = chat_events(gateway.url, {"message": QUESTION, **conversation})
    assert "search_query" not in event(first, "done")  # a first turn is searched as asked
    before = metric(llm, "http_requests_total", handler="/v1/chat/completions")
    done = event(chat_events(gateway.url, {"message": FOLLOW_UP, **conversation}), "done")
    after = metric(llm, "http_requests_total", handler="/v1/chat/completions")
    assert after == before + 2  # the rewrite, then the answer
    # The offline engine's text is no real rewrite; what matters is that it was searched.
    assert done["search_query"] and done["search_query"] != f"{QUESTION} {FOLLOW_UP}"
    assert done["timings"]["rewrite_ms"] > 0
    assert done["degraded"] == []


def test_a_failed_rewrite_falls_back_to_concatenation(stack: Stack, tmp_path: Path) -> None:
    with rewriting_gateway(
        stack, "gateway-rewrite-fails", tmp_path, rewrite_timeout_s="0.001"
    ) as svc:
        conversation = {"conversation_id": "rewrite-fails"}
        chat_events(svc.url, {"message": QUESTION, **conversation})
        events = chat_events(svc.url, {"message": FOLLOW_UP, **conversation})
        done = event(events, "done")
        assert done["degraded"] == ["rewrite"]
        assert done["search_query"] == f"{QUESTION} {FOLLOW_UP}"
        assert any(e.name == "token" for e in events)  # still answered
