"""A generation stream that ends without `data: [DONE]` was cut short (llm-svc and vLLM
always send it): the gateway must say so, never pass the part it got for a whole answer.

Before this was checked, a body that simply ended looked like a finished answer: the
client got `done`, and the fragment could be cached and remembered. A gateway of this
module's own runs on the session stack's retriever and reranker, with a stand-in model
(recording_llm) whose streamed body is cut where each test says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.stack import Stack

from recording_llm import RecordingLlm, recording_llm, stream_body
from service_helpers import assert_error, gateway_env, running_service
from sse_client import read_events

MODEL = "cut-llm"
PIECES = ["Honeybees", " dance", " to", " show", " the", " way."]
# How much of the stream the stand-in sends: "whole", "cut" (its role chunk and two
# pieces, then the body ends) or "empty" (a 200 with no body at all).
mode = {"now": "whole"}


def body(model: str, pieces: list[str]) -> bytes:
    whole = stream_body(model, pieces)
    if mode["now"] == "empty":
        return b""
    if mode["now"] == "cut":
        frames = whole.split(b"\n\n")
        return b"\n\n".join(frames[:3]) + b"\n\n"
    return whole


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingLlm]:
    with recording_llm(MODEL, lambda _: PIECES, body) as record:
        yield record


@pytest.fixture(scope="module")
def gw(
    stack: Stack, recorder: RecordingLlm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = gateway_env(
        stack.config, llm_url=recorder.url, allow_anonymous="true", cache_ttl_s="300",
        requests_per_minute="0", max_streams_per_key="0",
    )  # fmt: skip
    logs = tmp_path_factory.mktemp("cut-streams")
    with running_service("gateway-cut", "ragline_gateway", env, logs) as svc:
        yield svc.url


@pytest.fixture(autouse=True)
def whole_by_default() -> Iterator[None]:
    yield
    mode["now"] = "whole"


def chat(url: str, question: str) -> list[Any]:
    with httpx.stream("POST", f"{url}/api/chat", json={"message": question}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return read_events(r)


def openai_request(question: str, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "ragline",
        "stream": stream,
        "messages": [{"role": "user", "content": question}],
    }


def test_a_stream_cut_mid_answer_ends_with_an_error_and_is_not_cached(
    gw: str, recorder: RecordingLlm
) -> None:
    question = "How do honeybees show the way (cut)?"
    mode["now"] = "cut"
    events = chat(gw, question)
    names = [e.name for e in events]
    assert "".join(e.data["text"] for e in events if e.name == "token") == "".join(PIECES[:2])
    assert names[-1] == "error" and "done" not in names, names
    assert events[-1].data["code"] == "generation_failed"

    # Not cached: the same question asks the model again, and a whole answer then is.
    asked = len(recorder.bodies)
    mode["now"] = "whole"
    events = chat(gw, question)
    assert len(recorder.bodies) == asked + 1
    assert "".join(e.data["text"] for e in events if e.name == "token") == "".join(PIECES)
    assert events[-1].name == "done" and events[-1].data["cached"] is False
    assert chat(gw, question)[-1].data["cached"] is True
    assert len(recorder.bodies) == asked + 1


def test_a_cut_openai_stream_has_an_error_frame_and_no_done(gw: str) -> None:
    mode["now"] = "cut"
    request = openai_request("How do bees show the way (sdk)?", stream=True)
    with httpx.stream("POST", f"{gw}/v1/chat/completions", json=request, timeout=60) as r:
        assert r.status_code == 200, r.read()
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in frames
    error = orjson.loads(frames[-1])["error"]
    assert error["code"] == "generation_failed", frames
    contents = [
        c["choices"][0]["delta"].get("content")
        for c in map(orjson.loads, frames[:-1])
        if c.get("choices")
    ]
    assert "".join(filter(None, contents)) == "".join(PIECES[:2])


def test_a_cut_answer_not_streamed_is_a_503_not_a_short_answer(gw: str) -> None:
    mode["now"] = "cut"
    request = openai_request("How do bees show the way (whole)?")
    response = httpx.post(f"{gw}/v1/chat/completions", json=request, timeout=60)
    assert_error(response, 503, "generation_failed")
    assert response.headers["retry-after"] == "5"


def test_an_empty_stream_is_a_503_before_any_event(gw: str) -> None:
    mode["now"] = "empty"
    response = httpx.post(f"{gw}/api/chat", json={"message": "Bees (empty)?"}, timeout=60)
    assert_error(response, 503, "generation_unavailable")
