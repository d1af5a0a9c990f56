"""llm-svc with the offline extractive engine, against real processes on loopback."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from ragline_common.passages import Passage, render_sources
from ragline_llm.engines.extractive import (
    NO_GENERATION,
    NO_MATCH,
    NOTHING_FOUND,
    compose_answer,
    content_terms,
    paragraphs,
    pick_sentences,
    stem,
)

from service_helpers import assert_error, metric, post_malformed, post_until_ok, running_service

PASSAGES = [
    Passage(1, "Bananas", "Bananas are yellow when ripe. They grow in tropical regions."),
    Passage(
        2,
        "Sourdough",
        "A sourdough starter is a culture of flour and water. After feeding, a healthy "
        "starter doubles in volume within four to eight hours at room temperature. "
        "Bakers keep it in a jar.",
    ),
    Passage(3, "Rivers", "The Nile is one of the longest rivers in the world."),
]
QUESTION = "How long does a sourdough starter take to double in volume after feeding?"
PROMPT = render_sources(PASSAGES, QUESTION)
MESSAGES = [
    {"role": "system", "content": "Answer from the sources; cite them as [n]."},
    {"role": "user", "content": PROMPT},
]
LONG_PROMPT = render_sources(
    [
        Passage(
            n,
            f"Sourdough {n}",
            f"Sourdough starter number {n} doubles in volume after feeding when it is kept "
            "warm, fed with fresh flour and water, and stirred well every single day.",
        )
        for n in range(1, 4)
    ],
    QUESTION,
)


def sse_data(line: str) -> dict | str | None:
    if not line.startswith("data: "):
        return None
    payload = line[len("data: ") :]
    return payload if payload == "[DONE]" else orjson.loads(payload)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-logs")


@pytest.fixture(scope="module")
def url(log_dir: Path) -> Iterator[str]:
    env = {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "15"}
    with running_service("llm", "ragline_llm", env, log_dir, ready_timeout=60) as svc:
        yield svc.url


@pytest.fixture(scope="module")
def slow_single_url(log_dir: Path) -> Iterator[str]:
    env = {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "250", "RAGLINE_LLM_MAX_CONCURRENCY": "1"}
    with running_service("llm-slow", "ragline_llm", env, log_dir, ready_timeout=60) as svc:
        yield svc.url


# --- the sentence picker, no process ---------------------------------------------------


def test_picker_finds_the_answer_sentence_and_its_passage() -> None:
    picks = pick_sentences(PASSAGES, QUESTION)
    assert picks, "expected at least one sentence"
    assert 1 <= len(picks) <= 3
    assert picks[0].n == 2
    assert "four to eight hours" in picks[0].sentence
    assert all(p.n != 1 for p in picks)  # bananas share no content word with the question
    answer = compose_answer(PROMPT)
    assert answer.startswith(picks[0].sentence + " [2]")


def test_picker_normalises_words_and_handles_no_sources() -> None:
    for variants in (("double", "doubles", "doubled", "doubling"), ("feed", "feeding", "feeds")):
        assert len({stem(v) for v in variants}) == 1, variants
    assert content_terms("Starters doubled after feeding") == content_terms("starter doubles feed")
    assert "the" not in content_terms("the The THE")
    assert pick_sentences(PASSAGES, "the of and") == []
    assert pick_sentences([], QUESTION) == []
    assert compose_answer(render_sources([], QUESTION)) == NOTHING_FOUND
    # Not the gateway's layout: a chat UI's task or a chat with the model itself.
    assert compose_answer("just a question with no sources") == NO_GENERATION


# Hand-made passages on the cases the squad-dev measurement showed (see
# benchmarks/extractive_squad.py): the answering sentence shares few words with the
# question, headings and title lines sit right before sentences, a noun answers a verb.
NORMANDY = [
    Passage(
        1,
        "Duchy of Normandy",
        "The Duchy of Normandy was formed by treaty with King Charles III. The duchy of "
        "Normandy grew under its dukes. Normandy's dukes were vassals of the king.",
    ),
    Passage(
        2,
        "Normans",
        "The Normans gave their name to Normandy, a region in France. They were descended "
        "from Norse raiders.",
    ),
]
BEES = [
    Passage(
        1,
        "Apiary handbook",
        "# Apiary handbook\n\n## Keeping bees\n\nThe apiary keeper, Ms. Ada Lovelace, "
        "looks after forty hives. She checks them weekly.\n"
        "- Hives are painted white.\n- Hives stand on pallets\n",
    ),
    Passage(
        2,
        "Honey harvest",
        "Annual Report 2023\nHoney harvest\nThe harvest doubled in 2023 to 400 kilograms, "
        "sold at the village market.",
    ),
]


def ask(passages: list[Passage], question: str) -> str:
    return compose_answer(render_sources(passages, question))


def test_the_answer_is_the_sentence_that_answers_not_one_that_shares_a_word() -> None:
    # Every sentence names Normandy; only one says the country, and it gets the citation.
    answer = ask(NORMANDY, "In what country is Normandy located?")
    assert answer == "The Normans gave their name to Normandy, a region in France. [2]"
    answer = ask(BEES, "How much honey was harvested in 2023?")
    assert answer.startswith("The harvest doubled in 2023 to 400 kilograms") and "[2]" in answer


def test_words_match_by_stem_keeps_and_keeper() -> None:
    for variants in (
        ("keeps", "kept", "keeping", "keeper", "keepers"),
        ("located", "location", "locate"),
        ("govern", "governor", "government"),
    ):
        assert len({stem(v) for v in variants}) == 1, variants
    answer = ask(BEES, "Who keeps the hives?")
    assert answer.startswith("The apiary keeper, Ms. Ada Lovelace, looks after forty hives."), (
        answer
    )
    assert answer.endswith("[1]")


def test_headings_list_markers_and_title_lines_never_reach_the_answer() -> None:
    assert paragraphs(BEES[0].text) == [
        "The apiary keeper, Ms. Ada Lovelace, looks after forty hives. She checks them weekly.",
        "Hives are painted white.",
        "Hives stand on pallets",
    ]
    assert paragraphs(BEES[1].text) == [
        "The harvest doubled in 2023 to 400 kilograms, sold at the village market."
    ]
    # A line that carries on onto the next is no title, nor is a lone last line.
    wrapped = "Results\nThe company grew its revenue by\n20 percent in 2023.\nSee you soon"
    assert paragraphs(wrapped) == [
        "The company grew its revenue by 20 percent in 2023. See you soon"
    ]
    questions = ("Who keeps the hives?", "What colour are the hives painted?",
                 "What do the hives stand on?", "How much honey was harvested in 2023?",
                 "What is in the apiary handbook?")  # fmt: skip
    for question in questions:
        answer = ask(BEES, question)
        assert "#" not in answer and "- " not in answer, (question, answer)
        assert "Annual Report" not in answer and "handbook" not in answer.lower(), answer
    assert ask(BEES, "What colour are the hives painted?") == "Hives are painted white. [1]"


def test_nothing_that_answers_is_an_honest_dont_know() -> None:
    # Shares "temperature" and "water" with the sourdough passage, and nothing else.
    question = "At what temperature does water boil on the summit of Mount Everest?"
    assert pick_sentences(PASSAGES, question) == []
    assert ask(PASSAGES, question) == NO_MATCH
    assert "don't say" in NO_MATCH and "[" not in NO_MATCH
    assert ask(NORMANDY, "How many moons does Jupiter have?") == NO_MATCH


def test_an_answer_is_one_or_two_sentences_each_cited_to_its_own_passage() -> None:
    for passages, question in ((PASSAGES, QUESTION), (NORMANDY, "Who were the Normans?"),
                               (BEES, "Who keeps the hives?")):  # fmt: skip
        answer = ask(passages, question)
        texts = {p.n: " ".join(p.text.split()) for p in passages}
        cited = re.findall(r"(.+?) \[(\d)\](?: |$)", answer)
        assert 1 <= len(cited) <= 2, answer
        assert " ".join(f"{s} [{n}]" for s, n in cited) == answer
        for sentence, n in cited:
            assert sentence.strip() in texts[int(n)], (sentence, n)


# --- the service ----------------------------------------------------------------------


def test_non_stream_answer_cites_the_passage(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "ragline-extractive"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "four to eight hours" in choice["message"]["content"]
    assert "[2]" in choice["message"]["content"]
    assert "[1]" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(choice["message"]["content"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_cuts_with_finish_reason_length(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}, timeout=10
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 3
    assert r.json()["usage"]["completion_tokens"] == 3


def test_stream_is_incremental_and_ends_with_done(url: str) -> None:
    arrivals: list[float] = []
    chunks: list[dict] = []
    frames: list[dict | str] = []
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        for line in r.iter_lines():
            data = sse_data(line)
            if data is None:
                continue
            frames.append(data)
            if (
                isinstance(data, dict)
                and data["choices"]
                and data["choices"][0]["delta"].get("content")
            ):
                arrivals.append(time.perf_counter())
                chunks.append(data)

    assert frames[-1] == "[DONE]"
    first = frames[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert len({f["id"] for f in frames[:-1]}) == 1
    final = frames[-3]
    assert final["choices"][0]["finish_reason"] == "stop"
    usage_chunk = frames[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(chunks)

    assert len(chunks) >= 5
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert "four to eight hours" in text and "[2]" in text
    # Paced at 15 ms a token: the first chunk arrives well before the last.
    assert arrivals[-1] - arrivals[0] >= 0.6 * 0.015 * (len(chunks) - 1)


def test_stock_openai_sdk_stream_and_non_stream(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["ragline-extractive"]

    completion = client.chat.completions.create(model="ragline-extractive", messages=MESSAGES)
    answer = completion.choices[0].message.content
    assert "[2]" in answer and completion.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model="ragline-extractive", messages=MESSAGES, stream=True
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == answer
    assert finish == "stop"


def test_models_endpoint(url: str) -> None:
    body = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "ragline-extractive"
    assert body["data"][0]["object"] == "model"
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready == {"status": "ready", "engine": "extractive", "model": "ragline-extractive"}


def test_client_disconnect_aborts_generation(url: str) -> None:
    name = "ragline_generation_aborts_total"
    before = metric(url, name)
    tokens_before = metric(url, "ragline_llm_tokens_generated_total")
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            data = sse_data(line)
            if isinstance(data, dict) and data["choices"][0]["delta"].get("content"):
                assert metric(url, "ragline_llm_engine_requests", engine="extractive") == 1
                break  # leave mid-answer: closing the response drops the connection

    deadline = time.monotonic() + 10
    while metric(url, name) < before + 1 and time.monotonic() < deadline:
        pass  # polling /metrics over HTTP, with a deadline
    assert metric(url, name) == before + 1
    # Generation stopped: far fewer tokens than the ~70-word answer were made.
    assert metric(url, "ragline_llm_tokens_generated_total") - tokens_before < 30
    assert metric(url, "ragline_llm_active_requests") == 0
    assert metric(url, "ragline_llm_engine_requests", engine="extractive") == 0


def test_overload_past_max_concurrency_is_503(slow_single_url: str) -> None:
    url = slow_single_url
    request = {"messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=30) as held:
        assert held.status_code == 200
        # Keep the line iterator referenced: dropping a half-read httpx iterator closes the
        # connection, which the server rightly treats as a disconnect.
        lines = held.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break  # the one slot is taken
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES})
        assert_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        assert metric(url, "ragline_llm_active_requests") == 1
        del lines

    # The held stream was dropped, so its slot comes back.
    r = post_until_ok(
        f"{url}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}, within=10
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"messages": []}, 422, "invalid_request"),
        ({"messages": MESSAGES, "n": 2}, 400, "unsupported_parameter"),
        ({"messages": MESSAGES, "logprobs": True}, 400, "unsupported_parameter"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
        (
            {"messages": MESSAGES, "response_format": {"type": "json_object"}},
            400,
            "unsupported_parameter",
        ),
        ({"messages": MESSAGES, "presence_penalty": 3}, 422, "invalid_request"),
        ({"messages": "hello"}, 422, "invalid_request"),
        ({"messages": [{"role": "user", "content": 5}]}, 422, "invalid_request"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_request"),
        ({"messages": MESSAGES, "max_tokens": 0}, 422, "invalid_request"),
        ({"messages": MESSAGES, "max_tokens": "many"}, 422, "invalid_request"),
        ({"messages": MESSAGES, "temperature": 9}, 422, "invalid_request"),
        ({"messages": MESSAGES, "max_tokens": 20000}, 400, "max_tokens_too_large"),
    ],
    ids=[
        "empty-messages",
        "n-2",
        "logprobs",
        "tools",
        "json-response-format",
        "presence-penalty-out-of-range",
        "messages-string",
        "content-int",
        "bad-role",
        "max-tokens-0",
        "max-tokens-str",
        "temperature",
        "max-tokens-over-limit",
    ],
)
def test_bad_input_gets_the_error_envelope(url: str, payload: dict, status: int, code: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=10)
    assert_error(r, status, code)
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=10)
    assert ok.status_code == 200


def test_vllm_options_are_accepted_and_json_is_refused_by_the_extractive_engine(url: str) -> None:
    """What the gateway forwards (openai_policy.py) is taken as `vllm serve` takes it; the
    extractive engine ignores what does not apply to quoting, and says it writes no JSON."""
    options = {
        "logit_bias": {"50256": -100}, "min_p": 0.1, "reasoning_effort": "low",
        "response_format": {"type": "text"}, "repetition_penalty": 1.1,
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
    }  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, **options})
    assert r.status_code == 200, r.text
    assert "[2]" in r.json()["choices"][0]["message"]["content"]
    schema = {"name": "a", "schema": {"type": "object"}}
    for form in ({"type": "json_object"}, {"type": "json_schema", "json_schema": schema}):
        for stream in (False, True):
            body = {"messages": MESSAGES, "response_format": form, "stream": stream}
            refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            assert_error(refused, 400, "unsupported_parameter")
            assert "response_format" in refused.json()["error"]["message"]
    bad = {"messages": MESSAGES, "logit_bias": {"word": 1}}
    assert_error(httpx.post(f"{url}/v1/chat/completions", json=bad), 422, "invalid_request")


def test_malformed_json_is_400(url: str) -> None:
    r = post_malformed(f"{url}/v1/chat/completions", b'{"messages": [')
    assert_error(r, 400, "invalid_json")
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
