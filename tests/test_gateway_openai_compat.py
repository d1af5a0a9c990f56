"""OpenAI compatibility as chat UIs (Open WebUI) and SDKs use it: the parameter policy
(openai_policy.py), the knowledge-base switch (the generation model itself), and
citations every client maps right (citations.py, openwebui.py).

Two gateways: the session stack's, through nginx, on the extractive llm-svc; and one of
this module's own on the session stack's retriever and reranker but a recording stand-in
for llm-svc (a small HTTP server in the test, speaking llm-svc's OpenAI stream), which
keeps every request body it gets and answers with fixed text that cites [1] and [2], so
that what reaches llm-svc and where the markers stand are known exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from ragline_cli.stack import Stack
from ragline_llm.engines.extractive import NO_GENERATION

from recording_llm import RecordingLlm, recording_llm
from service_helpers import assert_error, gateway_env, metric, running_service

QUESTION = "How do honeybees tell each other where flowers are?"
RECORDER_MODEL = "recorder-llm"
EXTRACTIVE_MODEL = "ragline-extractive"  # the session stack's llm-svc
COLLECTION = "compat_docs"
DOC_URL = "https://docs.example.com/bees#intro"
DOC_TITLE = "The waggle dance"
# Two sections too long to share a chunk (the retriever cuts at headings, 160 words).
DOC_TEXT = (
    "# Direction\n\n"
    + "Honeybees tell each other where flowers are with the waggle dance. The angle of the "
    "waggle run to the vertical is the angle of the flowers to the sun. "
    * 4
    + "\n\n# Distance\n\n"
    + "In the waggle dance the length of the waggle run tells how far away the flowers "
    "are, so the honeybees that follow the dance find them. " * 4
)
# The recorder's answer, in these pieces: [1] twice, [2] once, and "[1, 2]".
ANSWER_PIECES = ["Foragers dance [1].", " The angle gives the direction [2],", " both [1, 2]."]
ANSWER = "".join(ANSWER_PIECES)
# What Open WebUI sends with every chat by default: its built-in tools, no tool_choice.
OPEN_WEBUI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Open WebUI built-in tool {name}",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
    for name in ("search_web", "fetch_url", "query_knowledge_files", "search_chats")
]
TITLE_TASK = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
    'history.\n### Output:\nJSON format: { "title": "your concise title here" }\n'
    f"### Chat History:\n<chat_history>\nUSER: {QUESTION}\n</chat_history>"
)


# --- a recording llm-svc ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingLlm]:
    with recording_llm(RECORDER_MODEL, lambda body: ANSWER_PIECES) as record:
        yield record


@pytest.fixture(scope="module")
def gw(
    stack: Stack, recorder: RecordingLlm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway on the recorder, with a collection holding one document of two chunks."""
    tmp = tmp_path_factory.mktemp("openai-compat")
    # Both chunks are sources (no relevance cut-off): the recorder cites [1] and [2], and
    # the gateway drops citations of sources it did not send.
    env = gateway_env(
        stack.config, llm_url=recorder.url, allow_anonymous="true", cache_ttl_s="0",
        requests_per_minute="0", max_streams_per_key="0", blend_max_drop="1",
    )  # fmt: skip
    with running_service("gateway-compat", "ragline_gateway", env, tmp / "logs") as svc:
        doc = {
            "id": "bees.md",
            "title": DOC_TITLE,
            "url": DOC_URL,
            "format": "markdown",
            "text": DOC_TEXT,
        }
        response = httpx.post(
            f"{svc.url}/api/collections/{COLLECTION}/documents",
            json={"documents": [doc]}, timeout=120,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["chunks"] == 2, response.text
        yield svc.url


def ask(url: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    body = {"model": COLLECTION, "messages": [{"role": "user", "content": QUESTION}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def stream_chunks(url: str, headers: dict[str, str] | None = None, **fields: Any) -> list[Any]:
    body = {"model": COLLECTION, "messages": [{"role": "user", "content": QUESTION}],
            "stream": True, **fields}  # fmt: skip
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def content_of(chunks: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def retrievals(stack: Stack) -> float:
    retriever = f"http://127.0.0.1:{stack.config.retriever_port}"
    reranker = f"http://127.0.0.1:{stack.config.reranker_port}"
    return metric(retriever, "http_requests_total", handler="/v1/retrieve") + metric(
        reranker, "http_requests_total", handler="/v1/rerank"
    )


# --- the parameter policy -----------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", [None, "auto", "none"], ids=["absent", "auto", "none"])
def test_tools_are_accepted_and_ignored_unless_a_call_is_forced(
    gw: str, recorder: RecordingLlm, tool_choice: str | None
) -> None:
    fields: dict[str, Any] = {"tools": OPEN_WEBUI_TOOLS}
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    response = ask(gw, **fields, parallel_tool_calls=True)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
    sent = recorder.bodies[-1]
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(sent), sent


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "search_web"}}},
    ],
    ids=["required", "named"],
)
def test_a_forced_tool_call_is_refused_before_any_work(
    gw: str, stack: Stack, recorder: RecordingLlm, fields: dict[str, Any]
) -> None:
    calls, searched = len(recorder.bodies), retrievals(stack)
    response = ask(gw, tools=OPEN_WEBUI_TOOLS, **fields)
    assert_error(response, 400, "unsupported_parameter")
    assert "tool_choice" in response.json()["error"]["message"]
    assert len(recorder.bodies) == calls and retrievals(stack) == searched


def test_every_refused_parameter_is_named(gw: str) -> None:
    response = ask(gw, n=2, logprobs=True, top_logprobs=3, tool_choice="required",
                   tools=OPEN_WEBUI_TOOLS)  # fmt: skip
    assert_error(response, 400, "unsupported_parameter")
    message = response.json()["error"]["message"]
    for name in ("n:", "logprobs:", "top_logprobs:", "tool_choice:"):
        assert name in message, message


GENERATION_OPTIONS = {
    "min_p": 0.05,
    "logit_bias": {"50256": -100.0, "13": 5.0},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    "reasoning_effort": "low",
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "seed": 7,
    "temperature": 0.3,
    "top_p": 0.9,
    "stop": ["\n\n"],
    "min_tokens": 2,
    "max_completion_tokens": 40,
}


@pytest.mark.parametrize("model", [COLLECTION, RECORDER_MODEL], ids=["with-kb", "without-kb"])
def test_generation_options_reach_llm_svc(gw: str, recorder: RecordingLlm, model: str) -> None:
    response = ask(gw, model=model, **GENERATION_OPTIONS)
    assert response.status_code == 200, response.text
    sent = recorder.bodies[-1]
    expected = {k: v for k, v in GENERATION_OPTIONS.items() if k != "max_completion_tokens"}
    assert {k: sent.get(k) for k in expected} == expected, sent
    assert sent["max_tokens"] == 40 and sent["stream"] is True


def test_unknown_and_openai_only_fields_are_accepted_and_ignored(
    gw: str, recorder: RecordingLlm
) -> None:
    ignored = {
        "store": True, "metadata": {"app": "x"}, "service_tier": "auto", "user": "u-1",
        "modalities": ["text"], "web_search_options": {}, "prompt_cache_key": "k",
        "ignore_eos": True, "reasoning": {"effort": "low"}, "some_vendor_field": 1,
    }  # fmt: skip
    response = ask(gw, **ignored)
    assert response.status_code == 200, response.text
    assert not set(ignored) & set(recorder.bodies[-1]), recorder.bodies[-1]


# --- the knowledge-base switch ------------------------------------------------------------


def test_the_generation_model_is_listed(gw: str) -> None:
    models = [m["id"] for m in httpx.get(f"{gw}/v1/models", timeout=10).json()["data"]]
    assert models[0] == "ragline" and COLLECTION in models
    assert models[-1] == RECORDER_MODEL and models.count(RECORDER_MODEL) == 1


@pytest.mark.parametrize(
    "fields",
    [{"model": RECORDER_MODEL}, {"model": "ragline", "use_knowledge_base": False}],
    ids=["generation-model", "use_knowledge_base-false"],
)
def test_without_the_knowledge_base_the_messages_go_straight_through(
    gw: str, stack: Stack, recorder: RecordingLlm, fields: dict[str, Any]
) -> None:
    messages = [
        {"role": "system", "content": "You write titles."},
        {"role": "user", "content": TITLE_TASK},
    ]
    searched = retrievals(stack)
    body = {"messages": messages, **fields}
    response = httpx.post(f"{gw}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "sources" not in answer and "conversation_id" not in answer
    assert "annotations" not in answer["choices"][0]["message"]
    assert recorder.bodies[-1]["messages"] == messages  # no passages, no prompt of ours
    assert recorder.bodies[-1]["model"] == RECORDER_MODEL
    chunks = stream_chunks(gw, messages=messages, **fields)
    assert content_of(chunks) == ANSWER
    assert not any("sources" in c or "event" in c for c in chunks)
    assert not any(c["choices"] and "annotations" in c["choices"][0]["delta"] for c in chunks)
    assert retrievals(stack) == searched  # no retrieval, no rerank


def test_use_knowledge_base_true_on_the_generation_model(gw: str, recorder: RecordingLlm) -> None:
    response = ask(gw, model=RECORDER_MODEL, use_knowledge_base=True, collection=COLLECTION)
    assert response.status_code == 200, response.text
    assert [s["doc_id"] for s in response.json()["sources"]] == ["bees.md", "bees.md"]
    assert recorder.bodies[-1]["messages"][-1]["content"].startswith("Sources:\n[1] ")


def test_use_knowledge_base_must_be_a_boolean(gw: str) -> None:
    assert_error(ask(gw, use_knowledge_base="no"), 422, "invalid_request")


def test_the_extractive_engine_answers_task_prompts_with_its_documented_reply(
    public_url: str,
) -> None:
    sdk = openai.OpenAI(base_url=f"{public_url}/v1", api_key="unused", max_retries=0)
    assert EXTRACTIVE_MODEL in [m.id for m in sdk.models.list()]
    completion = sdk.chat.completions.create(
        model=EXTRACTIVE_MODEL, messages=[{"role": "user", "content": TITLE_TASK}]
    )
    assert completion.choices[0].message.content == NO_GENERATION
    assert "sources" not in (completion.model_extra or {})
    # Asked for JSON it cannot write, it says so with a 400 instead.
    with pytest.raises(openai.BadRequestError, match="response_format"):
        sdk.chat.completions.create(
            model=EXTRACTIVE_MODEL,
            messages=[{"role": "user", "content": TITLE_TASK}],
            response_format={"type": "json_object"},
        )


# --- citations ----------------------------------------------------------------------------


def assert_citations(annotations: list[dict[str, Any]], content: str) -> None:
    cites = [a["url_citation"] for a in annotations]
    assert {a["type"] for a in annotations} == {"url_citation"}
    for cite in cites:
        marker = content[cite["start_index"] : cite["end_index"]]
        assert marker in ("[1]", "[2]", "[1, 2]"), (marker, cite)
        assert cite["title"] == DOC_TITLE  # no "[n] " in front
        assert cite["url"].startswith("https://docs.example.com/bees#chunk-"), cite["url"]
    by_url: dict[str, set[str]] = {}
    for cite in cites:
        marker = content[cite["start_index"] : cite["end_index"]]
        by_url.setdefault(cite["url"], set()).add(marker)
    # One URL per passage: the two chunks of the one document are two citations.
    assert len(by_url) == 2, by_url
    first, second = (by_url[url] for url in dict.fromkeys(c["url"] for c in cites))
    assert first == {"[1]", "[1, 2]"} and second == {"[2]", "[1, 2]"}  # ordered by n


def test_citations_point_at_their_markers_with_one_url_per_passage(gw: str) -> None:
    answer = ask(gw).json()
    message = answer["choices"][0]["message"]
    assert message["content"] == ANSWER
    assert_citations(message["annotations"], ANSWER)
    assert len(message["annotations"]) == 4  # [1], [2], and [1, 2] for each

    chunks = stream_chunks(gw)
    assert content_of(chunks) == ANSWER
    with_annotations = [
        i
        for i, c in enumerate(chunks)
        if c["choices"] and "annotations" in c["choices"][0]["delta"]
    ]
    assert len(with_annotations) == 1
    at = with_annotations[0]
    # After the last content, before the finish: the content they point into is whole.
    assert chunks[at - 1]["choices"][0]["delta"].get("content")
    assert chunks[at + 1]["choices"][0]["finish_reason"] == "stop"
    assert_citations(chunks[at]["choices"][0]["delta"]["annotations"], ANSWER)
    assert chunks[0]["sources"][0]["url"] == DOC_URL  # the document's own, as before


def source_events(chunks: list[Any]) -> list[dict[str, Any]]:
    return [c["event"] for c in chunks if "event" in c]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-OpenWebUI-User-Id": "u-42", "X-OpenWebUI-User-Name": "Ada"},
        {"X-OpenWebUI-Chat-Id": "owui-chat-1"},
        {"X-Ragline-Source-Events": "true"},
    ],
    ids=["openwebui-user", "openwebui-chat", "opt-in"],
)
def test_open_webui_gets_source_events_with_the_passage_text(
    gw: str, headers: dict[str, str]
) -> None:
    chunks = stream_chunks(gw, headers=headers)
    events = source_events(chunks)
    first_text = next(i for i, c in enumerate(chunks) if c["choices"] and
                      c["choices"][0]["delta"].get("content"))  # fmt: skip
    assert all(i < first_text for i, c in enumerate(chunks) if "event" in c)
    sources = chunks[0]["sources"]
    assert len(events) == len(sources) == 2
    for event, source in zip(events, sources, strict=True):
        assert event["type"] == "source"
        data = event["data"]
        assert data["document"] == [source["text"]]
        assert data["source"]["name"] == DOC_TITLE == data["metadata"][0]["name"]
        assert data["source"]["id"] == data["metadata"][0]["source"] == data["source"]["url"]
        assert data["source"]["id"].startswith("https://docs.example.com/bees#chunk-")
        assert "distances" not in data
    assert events[0]["data"]["source"]["id"] != events[1]["data"]["source"]["id"]
    # Not both: Open WebUI would merge them into one citation per URL.
    assert not any(c["choices"] and "annotations" in c["choices"][0]["delta"] for c in chunks)
    assert content_of(chunks) == ANSWER


def test_source_events_can_be_turned_off_and_the_switch_is_checked(gw: str) -> None:
    off = {"X-OpenWebUI-User-Id": "u-42", "X-Ragline-Source-Events": "false"}
    assert source_events(stream_chunks(gw, headers=off)) == []
    bad = ask(gw, headers={"X-Ragline-Source-Events": "maybe"}, stream=True)
    assert_error(bad, 400, "invalid_request")


def test_openai_sdk_gets_standard_chunks_and_open_webui_its_events_through_nginx(
    public_url: str,
) -> None:
    """The session stack (nginx, extractive engine): the SDK sees no `event` chunks and
    annotations that point at the answer's own markers; Open WebUI's headers pass nginx."""
    sdk = openai.OpenAI(base_url=f"{public_url}/v1", api_key="unused", max_retries=0)
    stream = sdk.chat.completions.create(
        model="ragline", messages=[{"role": "user", "content": QUESTION}], stream=True,
        tools=OPEN_WEBUI_TOOLS,  # type: ignore[arg-type]
    )  # fmt: skip
    chunks = list(stream)
    assert not any((c.model_extra or {}).get("event") for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    annotations = [
        a for c in chunks if c.choices for a in (c.choices[0].delta.model_extra or {}).get(
            "annotations") or []
    ]  # fmt: skip
    assert annotations, content
    sources = {s["n"]: s for s in chunks[0].model_extra["sources"]}
    for annotation in annotations:
        cite = annotation["url_citation"]
        n = int(content[cite["start_index"] : cite["end_index"]].strip("[]"))
        assert cite["title"] == (sources[n]["title"] or sources[n]["doc_id"])
        assert not cite["title"].startswith("[")
        assert cite["url"] == f"ragline:doc/{sources[n]['doc_id']}#chunk-" + sources[n][
            "chunk_id"].rpartition("#")[2]  # fmt: skip

    openwebui = stream_chunks(public_url, headers={"X-OpenWebUI-User-Id": "u-1"}, model="ragline")
    assert len(source_events(openwebui)) == len(openwebui[0]["sources"]) > 0


def test_the_policy_tables_name_request_fields() -> None:
    """What is forwarded is declared (and so validated) here; nothing is both."""
    from ragline_gateway.openai_policy import GENERATION_FIELDS, IGNORED
    from ragline_gateway.protocol import OpenAIChatRequest

    assert set(GENERATION_FIELDS) <= set(OpenAIChatRequest.model_fields)
    assert not set(GENERATION_FIELDS) & set(IGNORED)
