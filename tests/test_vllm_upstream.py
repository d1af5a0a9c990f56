"""The gateway on a stock vLLM server instead of llm-svc: `python -m
vllm.entrypoints.openai.api_server` (what `vllm serve` runs), vLLM's CPU build from
`.venv-vllm`, serving the tiny random Llama (tests/tiny_models.py), set as the gateway's
`LLM_URL` with nothing but settings (`LLM_HEALTH_PATH=/health`, `LLM_MODEL`).

Checked from outside, as a client and an operator see it: answers stream (native SSE and
the OpenAI SDK), a client that leaves mid-answer makes vLLM abort the generation (vLLM's
own log and metrics), sampling parameters reach vLLM (its logged `SamplingParams` and
their effect), and vLLM's refusals become the gateway's documented 4xx (and its queue
limit the documented 503). What differs from llm-svc: docs/llm-upstreams.md.

vLLM starts once for the module (~40 s on 2 idle cores, minutes on busy ones) and runs with
`--enable-log-requests`, so that its log shows each request's parameters and abort under
the gateway's request id (vLLM names a request `chatcmpl-<X-Request-ID>`). The model's
text is gibberish: only the mechanism is asserted, never the answer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from ragline_cli.stack import Stack
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.llm import LlmClient, LlmStream, upstream_error
from ragline_gateway.settings import GatewaySettings

from service_helpers import assert_error, gateway_env, metric, poll, running_service
from sse_client import read_events
from tiny_models import EOS
from vllm_helpers import (  # noqa: F401
    requires_vllm,
    run,
    stock_vllm,
    stop_point,
    tiny_llama_fixture,
)

MODEL = "tiny-llama"
MAX_MODEL_LEN = 4096
# vLLM's --max-num-queued-reqs: requests it holds at once (running or waiting); past it 503.
MAX_QUEUED = 2
GATEWAY_MAX_TOKENS = 24
# Long enough that a generation cut short by an abort is told apart from one that ran out.
LONG = 4000
MESSAGES = [{"role": "user", "content": "What do tardigrades survive?"}]
QUESTION = "How long does a sourdough starter take to double (asked of vllm serve)?"
# The answers' passages come from a collection of this module's own, so that the prompt
# (and what the tiny model makes of it) does not depend on what other tests left in the
# session stack: on the shared default collection a CI run of the same test on llm-svc
# once got an answer without a single token.
COLLECTION = "stock_vllm"
STARTER = {
    "id": "starter.md",
    "title": "Sourdough",
    "text": "# Feeding\n\nA fed sourdough starter doubles in four to eight hours.",
}


# --- vLLM's error bodies in ragline's envelope (no server needed) ----------------------


def vllm_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM 0.32's error body (`ErrorResponse`)."""
    return {
        "error": {"message": message, "type": "BadRequestError", "param": param, "code": status}
    }


def test_vllm_errors_map_to_llm_svc_codes() -> None:
    """The refusals vLLM 0.32 answers (messages copied from it) get the codes llm-svc
    gives for the same thing, keeping vLLM's message."""
    chars = (
        "This model's maximum context length is 4096 tokens. However, your prompt contains "
        "60031 characters (more than 49152 characters, ...). (parameter=input_text, value=60031)"
    )
    tokens = (
        "This model's maximum context length is 4096 tokens. However, your prompt contains at "
        "least 4097 input tokens, ... (parameter=input_tokens, value=4097)"
    )
    cases = [
        (vllm_error(400, chars, "input_text"), 400, "prompt_too_long"),
        (vllm_error(400, tokens, "input_tokens"), 400, "prompt_too_long"),
        (
            vllm_error(
                400,
                "The decoder prompt (length 5000) is longer than the maximum model "
                "length of 4096. Make sure ...",
            ),
            400,
            "prompt_too_long",
        ),
        (
            vllm_error(
                400,
                "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                "max_tokens",
            ),
            400,
            "prompt_too_long",
        ),
        (
            vllm_error(
                400,
                "max_tokens=8000 cannot be greater than max_model_len=4096. Please "
                "request fewer output tokens.",
                "max_tokens",
            ),
            400,
            "max_tokens_too_large",
        ),
        (
            vllm_error(
                400,
                "token_id(s) [999999] in logit_bias contain out-of-vocab token ids.",
                "logit_bias",
            ),
            400,
            "invalid_request",
        ),
        (
            vllm_error(400, "min_tokens must be less than or equal to max_tokens=2, got 10."),
            400,
            "invalid_request",
        ),
        (vllm_error(422, "unprocessable"), 422, "invalid_request"),
        # The model the gateway named is not served: its own setting, not the client's.
        (vllm_error(404, "The model `x` does not exist."), 502, "model_not_served"),
        (vllm_error(503, "The engine is currently busy ..."), 503, "overloaded"),
        (vllm_error(500, "boom"), 500, "engine_error"),
        # Older vLLM releases: the flat body.
        (
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            400,
            "prompt_too_long",
        ),
        (
            {
                "object": "error",
                "message": "temperature must be non-negative",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            400,
            "invalid_request",
        ),
    ]
    for body, status, code in cases:
        given = body["error"]["code"] if "error" in body else body["code"]
        got_status, got = upstream_error(given, body)
        assert (got_status, got["error"]["code"]) == (status, code), body
        message = body["error"]["message"] if "error" in body else body["message"]
        assert message in got["error"]["message"]

    # llm-svc's envelope passes unchanged; a body that is not JSON still gets a code.
    ours = {"error": {"code": "prompt_too_long", "message": "m", "request_id": "r"}}
    assert upstream_error(400, ours) == (400, ours)
    assert upstream_error(400, None) == (
        400,
        {"error": {"code": "invalid_request", "message": "answered 400"}},
    )


def streamed(*chunks: bytes) -> httpx.Response:
    """A 200 whose body arrives as `chunks`, as an upstream's stream does."""

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    return httpx.Response(200, stream=Body())


def test_a_refusal_as_the_first_event_of_a_stream_is_that_status() -> None:
    """vLLM checks some parameters only after its 200 (streamed requests): the gateway
    reads the first event before it answers, so the client still gets the plain 400."""
    refusal = vllm_error(400, "token_id(s) [999999] in logit_bias contain out-of-vocab", "x")
    body = b": ping\n\ndata: " + orjson.dumps(refusal) + b"\n\ndata: [DONE]\n\n"
    stream = LlmStream(streamed(body))
    with pytest.raises(UpstreamError) as refused:
        asyncio.run(stream.first_event())
    assert refused.value.status == 400 and refused.value.error_code == "invalid_request"
    assert "logit_bias" in refused.value.error_message

    # An answer: the first event is read ahead, and still the first delta.
    chunk = {"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]}
    body = b"data: " + orjson.dumps(chunk) + b"\r\n\r\ndata: [DONE]\r\n\r\n"

    async def read(stream: LlmStream) -> list[str]:
        await stream.first_event()
        return [d.text async for d in stream.deltas()]

    assert asyncio.run(read(LlmStream(streamed(body[:9], body[9:])))) == ["Hi"]


def test_the_llm_health_path_is_a_setting() -> None:
    assert LlmClient("http://127.0.0.1:1", 1).health_path == "/readyz"  # llm-svc's
    settings = GatewaySettings(llm_url="http://127.0.0.1:1", llm_health_path="/health")
    assert LlmClient.from_settings(settings, 1).health_path == "/health"


# --- the gateway on `vllm serve` -------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stock-vllm")


@pytest.fixture(scope="module")
def vllm_log(logs: Path) -> Path:
    return logs / "vllm-serve.log"


@pytest.fixture(scope="module")
def vllm(tiny_llama: Path, vllm_log: Path) -> Iterator[str]:
    args = [
        "--served-model-name",
        MODEL,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",  # no torch.compile: starts in half the time
        "--kv-cache-memory-bytes",
        str(256 * 2**20),  # on CPU, else a share of host RAM
        "--max-num-queued-reqs",
        str(MAX_QUEUED),
        "--enable-log-requests",  # each request's SamplingParams and its abort, by id
        "--disable-uvicorn-access-log",
    ]
    with stock_vllm("vllm-serve", tiny_llama, args, vllm_log, ready_timeout=400) as (url, _):
        yield url


@pytest.fixture(scope="module")
def gateway(stack: Stack, vllm: str, logs: Path) -> Iterator[str]:
    """A gateway of this module's own on the session stack's retriever and reranker, with
    vLLM's server as its LLM: ready only once its /readyz finds vLLM's /health."""
    env = gateway_env(
        stack.config,
        llm_url=vllm,
        llm_health_path="/health",
        llm_model=MODEL,
        max_tokens=str(GATEWAY_MAX_TOKENS),
        allow_anonymous="true",
        cache_ttl_s="0",
        requests_per_minute="0",
        max_streams_per_key="0",
    )
    if not stack.config.has_redis:
        env["RAGLINE_GATEWAY_REDIS_URL"] = ""
    with running_service("gateway-stock-vllm", "ragline_gateway", env, logs) as svc:
        ingested = httpx.post(
            f"{svc.url}/api/collections/{COLLECTION}/documents",
            json={"documents": [STARTER]},
            timeout=120,
        )
        assert ingested.status_code == 200, ingested.text
        yield svc.url


@pytest.fixture()
def url(gateway: str, vllm: str) -> str:
    """The gateway, with vLLM idle: streams dropped by earlier tests are aborted
    asynchronously, so wait for that rather than race it."""
    poll(
        lambda: (
            metric(vllm, "vllm:num_requests_running") == 0
            and metric(vllm, "vllm:num_requests_waiting") == 0
        ),
        30,
        "vLLM idle",
    )
    return gateway


@pytest.fixture(scope="module")
def no_eos(tiny_llama: Path) -> dict[str, int]:
    """A `logit_bias` that rules out the end-of-sequence token, so an answer runs to its
    max_tokens (the gateway ignores vLLM's `ignore_eos`, as its policy says)."""
    eos = Tokenizer.from_file(str(tiny_llama / "tokenizer.json")).token_to_id(EOS)
    assert eos is not None
    return {str(eos): -100}


def new_id(what: str) -> str:
    """A request id of the test's own: the gateway keeps it, and vLLM names the request
    `chatcmpl-<id>` in its log."""
    return f"stock-vllm-{what}-{uuid.uuid4().hex[:8]}"


def vllm_logged(log: Path, text: str) -> str:
    """The first line of vLLM's log that contains `text` (waited for: it logs as it goes)."""

    def find() -> str | None:
        return next((line for line in log.read_text().splitlines() if text in line), None)

    return poll(find, 10, f"vLLM's log: {text!r}")


def sampling_logged(log: Path, request_id: str) -> str:
    """The SamplingParams vLLM made of the gateway's request `request_id`."""
    return vllm_logged(log, f"Received request chatcmpl-{request_id}:")


def ask(url: str, request_id: str | None = None, **fields: Any) -> httpx.Response:
    """The generation model itself through the gateway's OpenAI API (no knowledge base:
    the messages go to vLLM as sent)."""
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    headers = {"x-request-id": request_id} if request_id else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def answer(url: str, request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    r = ask(url, request_id, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(url: str, **fields: Any) -> str:
    return str(answer(url, **fields)["choices"][0]["message"]["content"])


def has_content(line: str) -> bool:
    """An OpenAI stream line with answer text in it."""
    if not line.startswith("data: {"):
        return False
    chunk = orjson.loads(line[len("data: ") :])
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


@pytest.mark.slow
@requires_vllm
# The first test's setup starts vLLM: ~40 s alone on 2 cores, measured up to ~220 s while
# other test sessions shared them.
@pytest.mark.timeout(600)
class TestGatewayOnStockVllm:
    def test_readiness_and_model_come_from_vllm(self, url: str, vllm: str) -> None:
        """vLLM answers /health, not llm-svc's /readyz: the gateway is ready through
        `LLM_HEALTH_PATH`, and would not be without it."""
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["upstreams"]["llm"] is True
        default = LlmClient(vllm, 1)
        with pytest.raises(UpstreamError) as refused:
            run(default, default.call("GET", default.health_path, 2.0))
        assert "answered 404" in str(refused.value)
        # The model's name, when LLM_MODEL is not set, comes from vLLM's /v1/models.
        client = LlmClient(vllm, 1)
        assert run(client, client.model_name()) == MODEL
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]][-1] == MODEL

    def test_api_chat_streams_a_cited_answer(self, url: str, vllm_log: Path) -> None:
        request_id = new_id("chat")
        with httpx.stream(
            "POST",
            f"{url}/api/chat",
            json={"message": QUESTION, "collection": COLLECTION},
            headers={"x-request-id": request_id},
            timeout=120,
        ) as r:
            assert r.status_code == 200, r.read()
            events = read_events(r)

        names = [e.name for e in events]
        assert names[0] == "meta" and names[-1] == "done", names
        assert "error" not in names
        assert events[0].data["request_id"] == request_id
        sources = next(e.data["sources"] for e in events if e.name == "sources")
        assert sources and all(s["n"] >= 1 and s["text"] for s in sources)
        assert names.index("sources") < names.index("token")
        tokens = [e for e in events if e.name == "token"]
        assert "".join(e.data["text"] for e in tokens)
        done = events[-1].data
        assert done["cached"] is False and done["degraded"] == []
        assert 1 <= done["usage"]["completion_tokens"] <= GATEWAY_MAX_TOKENS
        # What vLLM generated with: the gateway's own MAX_TOKENS and TEMPERATURE.
        params = sampling_logged(vllm_log, request_id)
        assert f"max_tokens={GATEWAY_MAX_TOKENS}," in params and "temperature=0.2," in params

    def test_openai_sdk_streams_through_the_gateway(self, url: str, no_eos: dict[str, int]) -> None:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert MODEL in [m.id for m in sdk.models.list()]
        chunks = list(
            sdk.chat.completions.create(
                model="ragline",
                messages=[{"role": "user", "content": QUESTION}],
                stream=True,
                max_tokens=8,
                logit_bias=no_eos,
                extra_body={"collection": COLLECTION},
            )
        )
        assert chunks[0].model_extra and chunks[0].model_extra["sources"]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")

        completion = sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logit_bias=no_eos
        )
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "tardigrades " * 5000}]
            )
        assert refused.value.status_code == 400
        error = refused.value.body  # the SDK's: the envelope's `error`
        assert isinstance(error, dict) and error["code"] == "prompt_too_long"

    def test_sampling_parameters_reach_vllm(
        self, url: str, vllm_log: Path, no_eos: dict[str, int]
    ) -> None:
        request_id = new_id("sampling")
        body = answer(
            url,
            request_id,
            max_tokens=3,
            temperature=0.7,
            top_p=0.5,
            seed=11,
            stop=["@@@"],
            presence_penalty=0.5,
            frequency_penalty=0.25,
            min_tokens=1,
            logit_bias=no_eos,
        )
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        params = sampling_logged(vllm_log, request_id)
        for given in (
            "max_tokens=3,",
            "temperature=0.7,",
            "top_p=0.5,",
            "seed=11,",
            "stop=['@@@'],",
            "presence_penalty=0.5,",
            "frequency_penalty=0.25,",
            "min_tokens=1,",
        ):
            assert given in params, (given, params)

        # The seed is vLLM's: the same one gives the same sampled text, another one not.
        sampled = {"temperature": 1.0, "max_tokens": 16, "logit_bias": no_eos}
        first = text_of(url, seed=7, **sampled)
        assert text_of(url, seed=7, **sampled) == first
        assert text_of(url, seed=8, **sampled) != first
        # top_p this small leaves only the likeliest token: sampling turns greedy.
        greedy = {"temperature": 0, "max_tokens": 16, "logit_bias": no_eos}
        assert text_of(
            url, top_p=1e-6, temperature=1.0, seed=3, max_tokens=16, logit_bias=no_eos
        ) == text_of(url, **greedy)
        # A stop string taken from an answer ends the same answer just before it (the
        # penalty keeps the random model's greedy answer from repeating itself).
        penalised = text_of(url, presence_penalty=2.0, **greedy)
        at = stop_point(penalised)
        stopped = answer(url, presence_penalty=2.0, stop=[penalised[at : at + 2]], **greedy)
        assert stopped["choices"][0]["message"]["content"] == penalised[:at]
        assert stopped["choices"][0]["finish_reason"] == "stop"

    def test_client_disconnect_aborts_the_generation_in_vllm(
        self, url: str, vllm: str, vllm_log: Path, no_eos: dict[str, int]
    ) -> None:
        made = metric(vllm, "vllm:generation_tokens_total")
        finished = metric(vllm, "vllm:request_success_total")  # every finished_reason
        request_id = new_id("abort")
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "max_tokens": LONG,
            "temperature": 0,
            "logit_bias": no_eos,
        }
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json=body,
            headers={"x-request-id": request_id},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            # Kept referenced: a dropped, half-read httpx iterator closes the connection.
            lines = r.iter_lines()
            assert any(has_content(line) for line in lines)
            assert metric(vllm, "vllm:num_requests_running") == 1
            # Leaving the block closes the connection mid-answer.

        took = poll(
            lambda: metric(vllm, "vllm:num_requests_running") == 0, 10, "vLLM running back to 0"
        )
        # vLLM's own word for it, under the gateway's request id.
        vllm_logged(vllm_log, f"Request chatcmpl-{request_id} aborted.")
        # The engine stopped: far fewer tokens than asked for, and no request finished
        # (vLLM 0.32 counts a client's abort in no `request_success_total` series).
        assert metric(vllm, "vllm:generation_tokens_total") - made < LONG / 2, took
        assert metric(vllm, "vllm:request_success_total") == finished

    def test_a_prompt_longer_than_the_context_is_400_prompt_too_long(
        self, url: str, vllm: str
    ) -> None:
        def tokens(units: int) -> int:
            r = httpx.post(f"{vllm}/tokenize", json={"model": MODEL, "messages": messages(units)})
            return int(r.json()["count"])

        def messages(units: int) -> list[dict[str, str]]:
            return [{"role": "user", "content": " x" * units}]

        base, per_unit = tokens(0), tokens(1) - tokens(0)
        fill, spare = divmod(MAX_MODEL_LEN - base, per_unit)
        assert spare == 0 and tokens(fill) == MAX_MODEL_LEN
        cases = {
            # vLLM's three refusals: by characters before tokenizing, by tokens, and a
            # prompt that fills the context exactly (no room for one answer token).
            "characters": [{"role": "user", "content": "tardigrades survive " * 3000}],
            "tokens": messages(fill + 1),
            "fills the context": messages(fill),
        }
        for case, too_long in cases.items():
            for stream in (False, True):
                r = ask(url, messages=too_long, stream=stream)
                assert_error(r, 400, "prompt_too_long")
                message = r.json()["error"]["message"]
                assert "context" in message, (case, message)
        assert answer(url, messages=messages(fill - 4), max_tokens=100)["choices"][0][
            "finish_reason"
        ] in ("length", "stop")  # what fits is cut to the room left, as llm-svc does

    def test_bad_parameters_are_400_with_vllms_reason(self, url: str) -> None:
        """Values the gateway cannot check itself (they depend on the model) but vLLM
        refuses: a clear 400 in ragline's envelope, never a 5xx."""
        cases = [
            ({"logit_bias": {"999999": 5}}, "invalid_request", "logit_bias"),
            ({"min_tokens": 10, "max_tokens": 2}, "invalid_request", "min_tokens"),
            ({"max_tokens": 8000}, "max_tokens_too_large", "max_model_len"),
        ]
        for fields, code, reason in cases:
            for stream in (False, True):
                r = ask(url, stream=stream, **fields)
                assert_error(r, 400, code)
                assert reason in r.json()["error"]["message"]

    def test_past_vllms_queue_limit_is_503_with_retry_after(
        self, url: str, vllm: str, no_eos: dict[str, int]
    ) -> None:
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "max_tokens": LONG,
            "logit_bias": no_eos,
        }
        # Keep the line iterators referenced: dropping a half-read httpx iterator closes
        # the connection, which the gateway rightly takes as a disconnect.
        readers: list[Iterator[str]] = []
        with ExitStack() as held:
            for _ in range(MAX_QUEUED):
                r = held.enter_context(
                    httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60)
                )
                assert r.status_code == 200
                readers.append(r.iter_lines())
                assert any(has_content(line) for line in readers[-1])
            refused = ask(url, max_tokens=2)
            assert_error(refused, 503, "generation_unavailable")
            assert refused.headers["retry-after"]
            assert metric(vllm, "vllm:admission_rejections_total") >= 1
        readers.clear()

    def test_a_model_vllm_does_not_serve_is_the_gateways_fault(self, vllm: str) -> None:
        """vLLM's 404 for `LLM_MODEL` naming a model it does not serve is a 502 upstream
        error, which the gateway answers as 503 `generation_unavailable`, not a 404."""
        client = LlmClient(vllm, 1)
        opening = client.open_stream(
            MESSAGES, model="not-served", sampling={}, connect_timeout=5, read_timeout=30
        )
        with pytest.raises(UpstreamError) as failed:
            run(client, opening)
        assert failed.value.status == 502 and failed.value.error_code == "model_not_served"
