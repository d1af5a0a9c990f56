"""Property-based fuzzing of the gateway's public API (schemathesis, from /openapi.json).

Every operation of the OpenAPI document gets schemathesis' example, coverage and fuzzing
phases (valid and invalid inputs; a bounded number of examples), each request with a
valid admin+chat key (but for the coverage phase's cases that leave it out on purpose and
get a 401). The property: the gateway never answers 500 (or any 5xx but 503, the
documented answer when an upstream is unavailable), never shows a traceback, answers every
error with the JSON envelope, and is still alive and healthy at the end.

A gateway process of its own, on the session stack's retriever, reranker, llm-svc and
Redis. Its one key reaches only `fuzz_*` collections, so that fuzzed deletes and ingests
cannot touch the collections other tests use (names outside `fuzz_*` meet a 403); half of
the cases are steered towards what the key reaches (see `steer`) so that the fuzzer gets
past authorisation and validation to the retriever and llm-svc too.

Only our own check runs, not schemathesis' default ones: those hold the responses to the
OpenAPI document, which declares none of the error answers (401, 403, 404, 405, 413, 503),
nor the envelope (it names FastAPI's `{"detail": ...}` 422), nor the event stream of
/api/chat, nor the raw bodies of the document routes, so they fail every operation on
documentation gaps rather than bugs.

The tests are made from the OpenAPI document of the gateway's code when this module is
collected (schemathesis makes one test per operation then, and its lazy fixture loader
does not work with pytest 9); `test_the_fuzzed_schema_is_the_served_one` checks that it is
the gateway's /openapi.json.

`RAGLINE_FUZZ_EXAMPLES` sets the examples per operation of the fuzzing phase (default 30),
`RAGLINE_FUZZ_RANDOM=1` draws new inputs on each run instead of the same ones.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, Response

from ragline_cli.stack import Stack
from ragline_gateway.app import build_app
from ragline_gateway.openai_policy import IGNORED
from ragline_gateway.protocol import OpenAIChatRequest
from ragline_gateway.settings import GatewaySettings

from conftest import SAMPLES
from service_helpers import Service, bearer, gateway_env, running_service, write_keys

FUZZ_EXAMPLES = int(os.environ.get("RAGLINE_FUZZ_EXAMPLES", "30"))
FUZZ_RANDOM = os.environ.get("RAGLINE_FUZZ_RANDOM", "") == "1"
QUESTION = "How do honeybees tell each other where flowers are?"
OPENAI_FIELDS = set(OpenAIChatRequest.model_fields) | set(IGNORED)
COLLECTION = "fuzz_docs"  # the key's default collection, with one document in it
ENTRIES = [
    {"id": "fuzz-admin", "tenant": "fuzz", "scopes": ["admin", "chat"],
     "collections": ["fuzz_*"], "requests_per_minute": 0, "max_streams": 0},
]  # fmt: skip
# What an upstream outage or overload is answered with; anything else over 499 is a bug.
DEGRADED = 503


class Fuzzed:
    def __init__(self, svc: Service, key: str) -> None:
        self.svc = svc
        self.url = svc.url
        self.key = key
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.degraded: Counter[tuple[str, str]] = Counter()
        self.degraded_examples: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def fuzz_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = write_keys(tmp / "keys.json", ENTRIES)
    env = gateway_env(
        stack.config,
        api_keys_file=str(tmp / "keys.json"),
        default_collection=COLLECTION,
        cors_origins='["https://chat.example.com"]',
        max_tokens="8",
        # With keys /openapi.json is off unless asked for; the coverage phase's cases
        # without a key must not have the fuzzer's own address throttled.
        openapi_docs="true",
        auth_failure_limit="0",
    )
    with running_service("gateway-fuzz", "ragline_gateway", env, tmp / "logs", 180) as svc:
        fuzzed = Fuzzed(svc, keys["fuzz-admin"])
        sample = sorted(SAMPLES.glob("*.md"))[0]
        doc = {"id": sample.name, "title": sample.stem, "text": sample.read_text()}
        response = httpx.post(
            f"{svc.url}/api/collections/{COLLECTION}/documents",
            json={"documents": [doc]}, headers=bearer(fuzzed.key), timeout=300,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        yield fuzzed


def openapi_document() -> dict[str, Any]:
    """What the gateway serves at /openapi.json (its routes do not depend on settings)."""
    settings = GatewaySettings(allow_anonymous=True, api_keys_file="", api_keys="")
    return build_app(settings).openapi()


schema = schemathesis.openapi.from_dict(openapi_document())


@schemathesis.check
def no_server_error_but_degradation(ctx: CheckContext, response: Response, case: Case) -> None:
    """No 5xx but 503, no traceback, and every error is the JSON envelope."""
    body = response.content or b""
    assert response.status_code < 500 or response.status_code == DEGRADED, (
        f"{response.status_code} from {case.operation.label}: {body[:500]!r}"
    )
    assert b"Traceback" not in body, body[:2000]
    if response.status_code >= 400:
        error = orjson.loads(body)["error"]
        assert error["code"] and error["message"], body[:500]


def steer(case: Case) -> None:
    """Steer every other case (a coin flip on its content, the same on each run) towards
    what the key reaches: a collection name under `fuzz_`, the key's collection in a body,
    the default OpenAI `model`, a conversation that ends with a user's question and no
    undeclared OpenAI fields (the schema allows any, as OpenAI clients send many; they are
    accepted and ignored, and dropping them keeps the cases about the declared ones).
    Otherwise nearly every valid request would end in a 400, 403, 404 or 422 before it
    reaches the retriever and llm-svc."""
    body = case.body if isinstance(case.body, dict) else None
    if zlib.crc32(repr((case.path_parameters, body)).encode()) % 2:
        return
    name = (case.path_parameters or {}).get("collection")
    if isinstance(name, str) and not name.startswith("fuzz_"):
        case.path_parameters["collection"] = f"fuzz_{name}"
    if body is None:
        return
    if "collection" in body:
        body["collection"] = COLLECTION
    if isinstance(body.get("model"), str):
        body["model"] = "ragline"
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        question = messages[-1]
        question["role"] = "user"
        if not (isinstance(question.get("content"), str) and question["content"].strip()):
            question["content"] = QUESTION
        for field in [k for k in body if k not in OPENAI_FIELDS]:
            del body[field]


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not FUZZ_RANDOM,
    database=None,  # no example database (.hypothesis/ holds only caches, git-ignored)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors(case: Case, fuzz_gateway: Fuzzed) -> None:
    steer(case)
    response = case.call(base_url=fuzz_gateway.url, headers=bearer(fuzz_gateway.key), timeout=60)
    fuzz_gateway.statuses[(case.operation.label, response.status_code)] += 1
    if response.status_code == DEGRADED:
        code = orjson.loads(response.content)["error"]["code"]
        fuzz_gateway.degraded[(case.operation.label, code)] += 1
        fuzz_gateway.degraded_examples.setdefault(
            (case.operation.label, code),
            f"{case.path_parameters} {case.query} {case.body!r}"[:2000],
        )
    case.validate_response(response, checks=[no_server_error_but_degradation])


def test_the_fuzzed_schema_is_the_served_one(fuzz_gateway: Fuzzed) -> None:
    served = httpx.get(f"{fuzz_gateway.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == openapi_document()


def test_the_gateway_survived_the_fuzzing(fuzz_gateway: Fuzzed) -> None:
    assert fuzz_gateway.svc.proc.alive(), fuzz_gateway.svc.proc.log_tail()
    assert httpx.get(f"{fuzz_gateway.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{fuzz_gateway.url}/readyz", timeout=10).status_code == 200
    if not fuzz_gateway.statuses:
        return  # run on its own, without the fuzzing
    print("\nstatuses (operation, status): count")
    for (label, status), count in sorted(fuzz_gateway.statuses.items()):
        print(f"  {label:55} {status}: {count}")
    print(f"503 answers: {dict(fuzz_gateway.degraded) or 'none'}")
    for (label, code), example in fuzz_gateway.degraded_examples.items():
        print(f"  first 503 {code} on {label}: {example}")
    # The key was sent: most requests got past authentication, and some answers were whole.
    total = sum(fuzz_gateway.statuses.values())
    unauthorized = sum(n for (_, status), n in fuzz_gateway.statuses.items() if status == 401)
    assert unauthorized < total / 4, fuzz_gateway.statuses
    assert any(200 <= status < 300 for _, status in fuzz_gateway.statuses)
