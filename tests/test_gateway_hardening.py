"""What lets the gateway face the internet directly: security headers on every response,
a CORS allow-list, request body limits, refusal of OpenAI parameters that ask for what it
does not give (openai_policy.py), error bodies that give nothing away, API keys that never
reach the log, and a refusal to start without keys (or with keys that break tenant
isolation).

A gateway process of its own, with its own keys file, on the session stack's retriever,
reranker, llm-svc and Redis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.processes import ProcessFailed
from ragline_cli.stack import REPO_ROOT, Stack
from ragline_gateway.auth import new_key

from service_helpers import (
    Service,
    assert_error,
    bearer,
    gateway_env,
    running_service,
    write_keys,
)
from sse_client import read_events

QUESTION = "How do honeybees tell each other where flowers are?"
ALLOWED_ORIGIN = "https://chat.example.com"
OTHER_ORIGIN = "https://evil.example.net"
MAX_REQUEST_BYTES = 8 * 1024
MAX_UPLOAD_BYTES = 64 * 1024
ENTRIES = [
    {"id": "hardening-chat", "tenant": "hardening", "scopes": ["chat"],
     "collections": ["default"], "requests_per_minute": 0, "max_streams": 0},
    {"id": "hardening-admin", "tenant": "hardening", "scopes": ["admin", "chat"],
     "collections": ["hardening_*"], "requests_per_minute": 0, "max_streams": 0},
]  # fmt: skip
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
READY_TIMEOUT = 180
JSON = {"content-type": "application/json"}


class Gateway:
    def __init__(self, svc: Service, keys: dict[str, str]) -> None:
        self.svc = svc
        self.url = svc.url
        self.chat_key = keys["hardening-chat"]
        self.admin_key = keys["hardening-admin"]

    def post(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {**(bearer(key) if key else {}), **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("hardening")
    keys = write_keys(tmp / "keys.json", ENTRIES)
    env = gateway_env(
        stack.config,
        api_keys_file=str(tmp / "keys.json"),
        cors_origins=orjson.dumps([ALLOWED_ORIGIN]).decode(),
        max_request_bytes=str(MAX_REQUEST_BYTES),
        max_upload_bytes=str(MAX_UPLOAD_BYTES),
        max_tokens="16",
        # Everything the gateway logs, so that "the key is never logged" means something.
        log_level="debug",
    )
    with running_service(
        "gateway-hardening", "ragline_gateway", env, tmp / "logs", READY_TIMEOUT
    ) as svc:
        yield Gateway(svc, keys)


def openai_body(**extra: Any) -> dict[str, Any]:
    return {"model": "ragline", "messages": [{"role": "user", "content": QUESTION}], **extra}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, csp
    # An answer may hold a tenant's documents: no cache anywhere may store it.
    cache_control = [v.strip() for v in response.headers.get("cache-control", "").split(",")]
    assert "no-store" in cache_control, response.headers.get("cache-control")


# --- security headers ------------------------------------------------------------------


def test_security_headers_on_a_json_answer(gw: Gateway) -> None:
    response = gw.post("/v1/chat/completions", gw.chat_key, json=openai_body())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["choices"][0]["message"]["content"]
    assert_security_headers(response)


def test_security_headers_on_errors(gw: Gateway) -> None:
    responses = [
        httpx.get(f"{gw.url}/v1/models", timeout=10),  # no key: 401 from a dependency
        gw.post("/api/chat", gw.chat_key, json={"message": ""}),  # 422 from validation
        httpx.get(f"{gw.url}/no/such/route", timeout=10),  # 404 from the router
    ]
    assert [r.status_code for r in responses] == [401, 422, 404]
    for response in responses:
        assert response.json()["error"]["code"]
        assert_security_headers(response)


def test_security_headers_on_an_event_stream(gw: Gateway) -> None:
    with httpx.stream(
        "POST", f"{gw.url}/api/chat", json={"message": QUESTION},
        headers=bearer(gw.chat_key), timeout=60,
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert_security_headers(response)
        events = read_events(response)
    assert events[-1].name == "done"


def test_a_wrong_method_is_405_naming_the_allowed_ones(gw: Gateway) -> None:
    response = httpx.get(f"{gw.url}/api/chat", headers=bearer(gw.chat_key), timeout=10)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers.get("allow") == "POST"  # RFC 9110: a 405 says what is allowed
    assert_security_headers(response)


# --- CORS --------------------------------------------------------------------------------


def preflight(gw: Gateway, origin: str) -> httpx.Response:
    return httpx.options(
        f"{gw.url}/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
        timeout=10,
    )


def test_cors_preflight_from_the_allowed_origin(gw: Gateway) -> None:
    response = preflight(gw, ALLOWED_ORIGIN)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_cors_preflight_from_another_origin_is_refused(gw: Gateway) -> None:
    response = preflight(gw, OTHER_ORIGIN)
    assert response.status_code >= 400
    assert "access-control-allow-origin" not in response.headers


def test_cors_on_a_request_names_only_the_allowed_origin(gw: Gateway) -> None:
    def models(origin: str) -> httpx.Response:
        headers = {**bearer(gw.chat_key), "origin": origin}
        return httpx.get(f"{gw.url}/v1/models", headers=headers, timeout=10)

    allowed = models(ALLOWED_ORIGIN)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # A browser script may read the request id (and Retry-After) of its answers.
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    other = models(OTHER_ORIGIN)
    assert other.status_code == 200, other.text
    assert "access-control-allow-origin" not in other.headers


# --- body limits -------------------------------------------------------------------------

CHAT_ROUTES = ["/api/chat", "/v1/chat/completions"]


def oversized(path: str, size: int) -> bytes:
    """A well-formed body for `path` of at least `size` bytes."""
    text = "x" * size
    body = {"message": text} if path == "/api/chat" else openai_body(user=text)
    return orjson.dumps(body)


@pytest.mark.parametrize("path", CHAT_ROUTES)
def test_a_body_over_the_limit_is_413_with_content_length(gw: Gateway, path: str) -> None:
    response = gw.post(
        path, gw.chat_key, content=oversized(path, MAX_REQUEST_BYTES + 1),
        headers=JSON,
    )  # fmt: skip
    assert_error(response, 413, "payload_too_large")
    assert_security_headers(response)


@pytest.mark.parametrize("path", CHAT_ROUTES)
def test_a_chunked_body_over_the_limit_is_413(gw: Gateway, path: str) -> None:
    body = oversized(path, 2 * MAX_REQUEST_BYTES)

    def chunks() -> Iterator[bytes]:  # a generator: httpx sends it chunked
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    response = gw.post(path, gw.chat_key, content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "payload_too_large")
    assert_security_headers(response)


def test_a_body_under_the_limit_is_judged_on_its_content(gw: Gateway) -> None:
    body = orjson.dumps({"message": QUESTION, "padding": "x" * 100})  # an unknown field
    assert len(body) < MAX_REQUEST_BYTES
    response = gw.post("/api/chat", gw.chat_key, content=body, headers=JSON)
    assert_error(response, 422, "invalid_request")


def test_uploads_have_their_own_larger_limit(gw: Gateway) -> None:
    path = "/api/collections/hardening_docs/documents"
    # Over the chat limit, under the upload limit: the retriever judges it (a document
    # without text is refused, so nothing is written).
    body = orjson.dumps({"documents": [{"id": "d1", "title": "x" * (2 * MAX_REQUEST_BYTES)}]})
    response = gw.post(path, gw.admin_key, content=body, headers=JSON)
    assert response.status_code == 422, response.text

    def chunks() -> Iterator[bytes]:
        for _ in range((MAX_UPLOAD_BYTES + 8192) // 4096):
            yield b"x" * 4096

    response = gw.post(path, gw.admin_key, content=chunks(), headers={"content-type": "text/plain"})
    assert_error(response, 413, "payload_too_large")


# --- OpenAI parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tool_choice", "required"),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("n", 2),
    ],
)
def test_unsupported_openai_parameters_are_refused(gw: Gateway, field: str, value: Any) -> None:
    """Refused only what asks for an answer ragline does not give (openai_policy.py)."""
    body = openai_body(**{field: value}, tools=[{"type": "function", "function": {"name": "f"}}])
    response = gw.post("/v1/chat/completions", gw.chat_key, json=body)
    assert_error(response, 400, "unsupported_parameter")
    assert field in response.json()["error"]["message"]


def test_every_unsupported_parameter_is_named(gw: Gateway) -> None:
    body = openai_body(n=3, logprobs=True, top_logprobs=2, tool_choice="required", tools=[])
    response = gw.post("/v1/chat/completions", gw.chat_key, json=body)
    assert_error(response, 400, "unsupported_parameter")
    message = response.json()["error"]["message"]
    assert all(name in message for name in ("n:", "logprobs", "top_logprobs", "tool_choice"))


def test_a_request_the_generator_would_refuse_is_a_client_error(gw: Gateway) -> None:
    """Not a 503 "generation unavailable" with Retry-After, which clients retry for ever
    (llm-svc, like OpenAI, takes at most 4 stop sequences; found by test_gateway_fuzz)."""
    body = openai_body(stop=["a", "b", "c", "d", "e"])
    response = gw.post("/v1/chat/completions", gw.chat_key, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "stop" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("metadata", {"source": "test"}),
        ("store", False),
        ("tools", [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]),
        ("tool_choice", "none"),
        ("min_p", 0.1),
        ("logit_bias", {"50256": -100}),
        ("reasoning_effort", "low"),
        ("response_format", {"type": "text"}),
        ("an_unknown_vendor_field", {"x": 1}),
    ],
)
def test_documented_ignored_parameters_are_accepted(gw: Gateway, field: str, value: Any) -> None:
    response = gw.post("/v1/chat/completions", gw.chat_key, json=openai_body(**{field: value}))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


# --- errors give nothing away ------------------------------------------------------------

# Inputs that made the gateway fail with a 500 when this was written: values that pass
# validation but cannot be encoded for an upstream call (orjson refuses ints beyond 64 bits
# and lone surrogates, the stdlib JSON encoder NaN and Infinity). Raw bytes, since a JSON
# encoder would refuse to write most of them too.
UNENCODABLE = {
    "seed_over_64_bits": (
        "/v1/chat/completions",
        b'{"model":"ragline","seed":18446744073709551616,'
        b'"messages":[{"role":"user","content":"bees"}]}',
    ),
    "filter_nan": ("/api/chat", b'{"message":"bees","filters":{"year":NaN}}'),
    "filter_infinity": ("/api/chat", b'{"message":"bees","filters":{"year":[1e999]}}'),
    "openai_filter_nan": (
        "/v1/chat/completions",
        b'{"model":"ragline","filters":{"year":-Infinity},'
        b'"messages":[{"role":"user","content":"bees"}]}',
    ),
    "stop_lone_surrogate": (
        "/v1/chat/completions",
        b'{"model":"ragline","stop":["\\ud800"],"messages":[{"role":"user","content":"bees"}]}',
    ),
    "content_lone_surrogate": (
        "/v1/chat/completions",
        b'{"model":"ragline","messages":[{"role":"user","content":"bees \\ud800"}]}',
    ),
    "history_lone_surrogate": (
        "/v1/chat/completions",
        b'{"model":"ragline","messages":[{"role":"user","content":"bees?"},'
        b'{"role":"assistant","content":"\\udbff"},{"role":"user","content":"and wasps?"}]}',
    ),
    "filter_value_lone_surrogate": (
        "/api/chat",
        b'{"message":"bees","filters":{"source":["\\ud800"]}}',
    ),
    "content_part_lone_surrogate": (
        "/v1/chat/completions",
        b'{"model":"ragline","messages":[{"role":"user",'
        b'"content":[{"type":"text","text":"bees \\udfff"}]}]}',
    ),
}
# Other bad requests: each answered with the error envelope.
BAD_REQUESTS = {
    "cut_off_json": ("POST", "/api/chat", "chat", {"content": b'{"message": "be', "headers": JSON}),
    "not_an_object": ("POST", "/api/chat", "chat", {"content": b"[1, 2]", "headers": JSON}),
    "no_key": ("POST", "/api/chat", None, {"json": {"message": QUESTION}}),
    "wrong_key": ("POST", "/api/chat", "wrong", {"json": {"message": QUESTION}}),
    "chat_key_on_admin_route": ("GET", "/api/collections", "chat", {}),
    "other_collection": ("POST", "/api/chat", "chat",
                         {"json": {"message": QUESTION, "collection": "globex_docs"}}),
    "top_k_too_large": ("POST", "/api/chat", "chat",
                        {"json": {"message": QUESTION, "top_k": 10**30}}),
    "question_too_long": ("POST", "/api/chat", "chat", {"json": {"message": "x" * 4001}}),
    "image_part": ("POST", "/v1/chat/completions", "chat", {"json": openai_body(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])}),
    "last_not_user": ("POST", "/v1/chat/completions", "chat", {"json": openai_body(messages=[
        {"role": "assistant", "content": "hi"}])}),
    "bad_model_name": ("POST", "/v1/chat/completions", "chat", {"json": openai_body(model="../x")}),
    "bad_job_id": ("GET", "/api/jobs/..%2F..%2Fetc", "admin", {}),
    "dot_segments_in_doc_id": (
        "DELETE", "/api/collections/hardening_docs/documents/a/%2E%2E/b", "admin", {}),
    "unknown_job": ("GET", "/api/jobs/" + "0" * 32, "admin", {}),
    "wrong_method": ("GET", "/api/chat", "chat", {}),
}  # fmt: skip
INTERNALS = re.compile(
    r"Traceback|File \"|site-packages|\.py\b|line \d+|" + re.escape(str(REPO_ROOT)), re.I
)


def send(
    gw: Gateway, method: str, path: str, who: str | None, kw: dict[str, Any]
) -> httpx.Response:
    key = {"chat": gw.chat_key, "admin": gw.admin_key, "wrong": new_key(), None: None}[who]
    headers = {**(bearer(key) if key else {}), **kw.get("headers", {})}
    return httpx.request(
        method, f"{gw.url}{path}", headers=headers, timeout=60,
        **{k: v for k, v in kw.items() if k != "headers"},
    )  # fmt: skip


def assert_reveals_nothing(response: httpx.Response) -> None:
    assert not INTERNALS.search(response.text), response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}, error


@pytest.mark.parametrize("case", [*BAD_REQUESTS, *UNENCODABLE])
def test_error_bodies_reveal_nothing(gw: Gateway, case: str) -> None:
    if case in BAD_REQUESTS:
        response = send(gw, *BAD_REQUESTS[case])
    else:
        path, body = UNENCODABLE[case]
        response = gw.post(path, gw.chat_key, content=body, headers=JSON)
    assert response.status_code >= 400, response.text
    assert_reveals_nothing(response)


@pytest.mark.parametrize("case", UNENCODABLE)
def test_unencodable_input_is_a_client_error(gw: Gateway, case: str) -> None:
    path, body = UNENCODABLE[case]
    response = gw.post(path, gw.chat_key, content=body, headers=JSON)
    assert 400 <= response.status_code < 500, response.text
    assert_reveals_nothing(response)


def test_an_internal_error_is_the_bare_envelope_with_headers() -> None:
    """A 500 has the envelope, its request id (body, header), the security headers and no
    traceback. No input makes the real gateway fail any more, so a route that raises is
    added to the gateway's own app, in process."""
    from fastapi.testclient import TestClient

    from ragline_gateway.app import build_app
    from ragline_gateway.settings import GatewaySettings

    app = build_app(GatewaySettings(allow_anonymous=True))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail /work/main/gateway/x.py line 1")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"x-request-id": "boom-1"})
    assert response.status_code == 500
    assert response.json()["error"] == {
        "code": "internal_error", "message": "internal error; see the service log",
        "request_id": "boom-1",
    }  # fmt: skip
    assert response.headers["x-request-id"] == "boom-1"
    assert "secret detail" not in response.text
    assert_reveals_nothing(response)
    assert_security_headers(response)


# --- the key stays secret ----------------------------------------------------------------


def test_api_keys_never_reach_the_log(gw: Gateway) -> None:
    wrong = new_key()
    calls = [
        ("POST", "/api/chat", bearer(gw.chat_key), 200),
        ("GET", "/api/collections", bearer(gw.admin_key), 200),
        ("GET", "/api/collections", bearer(gw.chat_key), 403),  # lacks the admin scope
        ("POST", "/api/chat", bearer(wrong), 401),  # not a key
        ("GET", "/v1/models", {"authorization": f"Basic {wrong}"}, 401),  # not as a Bearer
    ]
    request_ids = []
    for method, path, headers, status in calls:
        body = {"message": QUESTION} if method == "POST" else None
        response = httpx.request(method, f"{gw.url}{path}", json=body, headers=headers, timeout=60)
        assert response.status_code == status, (path, response.text)
        request_ids.append(response.headers["x-request-id"])

    log_path = gw.svc.proc.log_path
    deadline = time.monotonic() + 10
    while True:  # the access log line comes when each response has been sent
        text = log_path.read_text(errors="replace")
        if all(rid in text for rid in request_ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(rid in text for rid in request_ids), "requests missing from the log"
    for key in (gw.chat_key, gw.admin_key, wrong):
        secret = key.removeprefix("rl-")
        # Neither the key nor a recognisable part of it.
        assert secret[:16] not in text and secret[-16:] not in text


# --- refusing to start -------------------------------------------------------------------


def start_refused(stack: Stack, tmp: Path, **settings: str) -> str:
    """Start a gateway that must refuse to run; the message it died with."""
    env = gateway_env(
        stack.config,
        **{"allow_anonymous": "false", "api_keys": "", "api_keys_file": "", **settings},
    )
    with pytest.raises(ProcessFailed) as failed:
        with running_service("gateway-refused", "ragline_gateway", env, tmp, READY_TIMEOUT):
            pass
    message = str(failed.value)
    assert re.search(r"exited with [1-9]", message), message  # not "not ready after ..."
    return message


def test_refuses_to_start_without_keys(stack: Stack, tmp_path: Path) -> None:
    message = start_refused(stack, tmp_path)
    assert "gateway not started: no API keys configured" in message
    assert "RAGLINE_GATEWAY_API_KEYS_FILE" in message
    assert "RAGLINE_GATEWAY_ALLOW_ANONYMOUS" in message


def test_refuses_to_start_with_an_empty_keys_file(stack: Stack, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, [])
    message = start_refused(stack, tmp_path, api_keys_file=str(keys_file))
    assert "no API keys configured" in message


def test_refuses_tenants_with_overlapping_collections(stack: Stack, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys = write_keys(
        keys_file,
        [
            {"id": "acme-admin", "tenant": "acme", "scopes": ["admin"], "collections": ["acme_*"]},
            {"id": "globex-chat", "tenant": "globex", "scopes": ["chat"],
             "collections": ["globex_docs", "acme_docs"]},
        ],
    )  # fmt: skip
    message = start_refused(stack, tmp_path, api_keys_file=str(keys_file))
    assert "invalid API keys" in message and "overlap" in message
    assert "'acme_*' (tenant acme)" in message and "'acme_docs' (tenant globex)" in message
    # The message names the problem, never a key or its hash.
    for key in keys.values():
        assert key not in message
    assert not re.search(r"[0-9a-f]{64}", message)
