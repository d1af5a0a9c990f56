"""Citations of sources that do not exist never reach the client, and the prompt asks a
generation model for citations of the sources that do (prompt.py, citations.py).

A gateway of this module's own on the session stack's retriever and reranker, with a
stand-in for llm-svc on vLLM: a small HTTP server in the test that speaks llm-svc's
OpenAI stream, keeps every request body, and answers as a model that miscounts its
sources: it cites [7] and the number one past the last source, with markers split across
tokens ("[" in one token, "7" in the next, "]." in a third) the way a tokenizer splits
them. What the client gets is checked on both endpoints, streamed and not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.stack import Stack
from ragline_common.passages import DONT_KNOW, parse_sources
from ragline_gateway.citations import MARKER, CitationFilter, drop_unknown_citations
from ragline_gateway.prompt import SYSTEM_PROMPT

from recording_llm import RecordingLlm, recording_llm
from service_helpers import chat_events, event, gateway_env, running_service

MODEL = "miscounting-llm"
COLLECTION = "citation_docs"
QUESTION = "How do honeybees find the flowers, the hive and the water?"
SECTIONS = ("Flowers", "Hive", "Water")
# Three sections, each too long to share a chunk with the next (160-word windows).
DOC_TEXT = "\n\n".join(
    f"# {name}\n\n"
    + f"Honeybees find the {name.lower()} by the waggle dance of the foragers, whose run "
    "gives the direction and whose length gives the distance to the place they found. " * 4
    for name in SECTIONS
)


def pieces(sources: int) -> list[str]:
    """The stand-in's answer for a prompt of `sources` passages, token by token."""
    last, past = sources, sources + 1
    return ["Bees dance [", "1] and turn", " [", "7", "].", f" The angle [{last},", " 7] gives",
            f" the direction [{past}]", " [7", "][9]", "."]  # fmt: skip


def expected(sources: int) -> str:
    return f"Bees dance [1] and turn. The angle [{sources}] gives the direction."


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingLlm]:
    def answer(body: dict[str, Any]) -> list[str]:
        passages, _ = parse_sources(body["messages"][-1]["content"])
        return pieces(len(passages))

    with recording_llm(MODEL, answer) as record:
        yield record


@pytest.fixture(scope="module")
def gw(
    stack: Stack, recorder: RecordingLlm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("citations")
    env = gateway_env(
        stack.config, llm_url=recorder.url, allow_anonymous="true", cache_ttl_s="0",
        requests_per_minute="0", max_streams_per_key="0",
    )  # fmt: skip
    with running_service("gateway-citations", "ragline_gateway", env, tmp / "logs") as svc:
        doc = {"id": "bees.md", "title": "Bees", "format": "markdown", "text": DOC_TEXT}
        response = httpx.post(
            f"{svc.url}/api/collections/{COLLECTION}/documents",
            json={"documents": [doc]}, timeout=120,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["chunks"] == 3, response.text
        yield svc.url


def openai_body(**fields: Any) -> dict[str, Any]:
    return {"model": COLLECTION, "messages": [{"role": "user", "content": QUESTION}], **fields}


def assert_no_unknown_citation(text: str, sources: int) -> None:
    for match in MARKER.finditer(text):
        assert all(1 <= int(n) <= sources for n in match.group(1).split(",")), text


# --- the filter, no process ---------------------------------------------------------------


def test_the_filter_drops_unknown_citations_however_the_tokens_split() -> None:
    text = "".join(pieces(3)) + " Also [2][7] and arr[2024] and [see](x) and [3 ]"
    want = expected(3) + " Also [2] and arr[2024] and [see](x) and [3 ]"
    assert drop_unknown_citations(text, {1, 2, 3}) == want
    for size in range(1, 8):  # every way of cutting it into pieces of `size` characters
        for offset in range(size):
            cuts = [text[:offset]] + [text[i : i + size] for i in range(offset, len(text), size)]
            citations = CitationFilter({1, 2, 3})
            out = [citations.feed(piece) for piece in cuts]
            assert "".join(out) + citations.flush() == want, (size, offset)
    # Only a tail that may still become a marker waits; other text passes at once.
    citations = CitationFilter({1, 2, 3})
    assert citations.feed("Bees dance") == "Bees dance"
    assert citations.feed(" [") == ""
    assert citations.feed("1]") == " [1]"
    assert citations.feed(" in [20") == " in"
    assert citations.feed("24].") == " [2024]."


# --- through a gateway --------------------------------------------------------------------


def test_the_prompt_asks_for_citations_of_the_numbered_sources(
    gw: str, recorder: RecordingLlm
) -> None:
    r = httpx.post(f"{gw}/v1/chat/completions", json=openai_body(), timeout=60)
    assert r.status_code == 200, r.text
    system, *_, user = recorder.bodies[-1]["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert "square brackets" in system["content"] and "[1]" in system["content"]
    assert f'"{DONT_KNOW}"' in system["content"]
    assert user["content"].startswith("Sources:\n[1] Bees\n")


def test_native_sse_never_shows_a_citation_of_a_missing_source(gw: str) -> None:
    events = chat_events(gw, {"message": QUESTION, "collection": COLLECTION})
    sources = event(events, "sources")["sources"]
    assert 1 <= len(sources) <= 5, sources
    tokens = [e.data["text"] for e in events if e.name == "token"]
    assert "".join(tokens) == expected(len(sources))
    for token in tokens:
        assert "7" not in token and "9" not in token, tokens
    assert_no_unknown_citation("".join(tokens), len(sources))
    assert [e.name for e in events][-1] == "done"


def test_openai_stream_and_completion_never_show_a_citation_of_a_missing_source(gw: str) -> None:
    with httpx.stream(
        "POST", f"{gw}/v1/chat/completions", json=openai_body(stream=True), timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [orjson.loads(line) for line in lines[:-1]]
    sources = len(chunks[0]["sources"])
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == expected(sources)
    annotations = [a["url_citation"] for d in deltas for a in d.get("annotations", [])]
    assert annotations
    for cite in annotations:
        assert content[cite["start_index"] : cite["end_index"]] in ("[1]", f"[{sources}]")

    r = httpx.post(f"{gw}/v1/chat/completions", json=openai_body(), timeout=60)
    message = r.json()["choices"][0]["message"]
    assert message["content"] == expected(len(r.json()["sources"]))
    assert_no_unknown_citation(message["content"], len(r.json()["sources"]))
