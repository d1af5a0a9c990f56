"""The attacks of issue 21, replayed against a real gateway with API keys: uvicorn on
loopback, on the session stack's retriever, reranker, llm-svc and Redis.

Two tenants. Tenant `seca` has an admin key and three chat keys: `seca-eng` reaches the
engineering and operations collections, `seca-sales` (chat only) the sales one, and
`seca-reader` (admin reads, two requests a minute) the sales one too. Tenant `secg`
has one key of its own.

- conversation memory: a key that sends another key's conversation id (same tenant) gets
  none of its history, and leaves it as it was; nor does one key's conversation follow it
  into another collection;
- a flood of cheap reads (`GET /v1/models`, `/api/collections`, `/api/jobs`) meets the
  key's calls per minute: 429 with Retry-After;
- a flood of failed authentications from one client: 429 with Retry-After for that
  client, a valid key included, and for nobody else; directly, through a trusted proxy's
  X-Forwarded-For, and through the repo's nginx;
- huge request heads (an 8 MB header, 2,000 headers) straight at the gateway port: 431
  with the JSON error envelope;
- names with a trailing newline: refused (4xx), never taken as the name without it;
- a keys file with no keys stops the gateway from starting, even with ALLOW_ANONYMOUS;
- /docs and /openapi.json are off with keys, on without; /metrics answers as before.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from ragline_cli.processes import ProcessFailed, free_port, nginx
from ragline_cli.stack import REPO_ROOT, Stack

from service_helpers import (
    Service,
    assert_error,
    bearer,
    chat_events,
    event,
    gateway_env,
    poll,
    running_service,
    write_keys,
)

QUESTION = "What is the launch code of Project Falcon?"
FOLLOW_UP = "Who keeps it?"
DOCS = {
    "seca_eng": {"id": "falcon", "title": "Project Falcon",
                 "text": "The launch code of Project Falcon is 7431. Its keeper is Ada."},
    "seca_ops": {"id": "rota", "title": "Operations rota",
                 "text": "The operations rota changes every Monday. Its keeper is Bo."},
    "seca_sales": {"id": "pricing", "title": "Price list",
                   "text": "The price list of Project Falcon is public. Its keeper is Cy."},
    "secg_docs": {"id": "kestrel", "title": "Project Kestrel",
                  "text": "Project Kestrel has no launch code. Its keeper is Di."},
}  # fmt: skip
ENTRIES = [
    {"id": "seca-admin", "tenant": "seca", "scopes": ["admin"], "collections": ["seca_*"],
     "requests_per_minute": 0},
    {"id": "seca-eng", "tenant": "seca", "scopes": ["chat"],
     "collections": ["seca_eng", "seca_ops"], "requests_per_minute": 0},
    {"id": "seca-sales", "tenant": "seca", "scopes": ["chat"], "collections": ["seca_sales"],
     "requests_per_minute": 0},
    {"id": "seca-reader", "tenant": "seca", "scopes": ["admin", "chat"],
     "collections": ["seca_sales"], "requests_per_minute": 2},
    {"id": "secg-admin", "tenant": "secg", "scopes": ["admin", "chat"],
     "collections": ["secg_*"], "requests_per_minute": 0},
]  # fmt: skip
CALL_RATE_MULTIPLIER = 10  # the setting's default: seca-reader may make 20 calls a minute
AUTH_FAILURE_LIMIT = 5


class Gateway:
    def __init__(self, svc: Service, keys: dict[str, str], redis_port: int) -> None:
        self.svc = svc
        self.url = svc.url
        self.port = svc.port
        self.keys = keys
        self.redis = redis.Redis(port=redis_port, decode_responses=True)

    def call(self, method: str, path: str, key_id: str | None = None, **kw: Any) -> httpx.Response:
        headers = {**(bearer(self.keys[key_id]) if key_id else {}), **kw.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def ask(self, key_id: str, collection: str, message: str, conversation: str) -> list[Any]:
        """One `/api/chat` answer in `conversation`: its events."""
        body = {"message": message, "collection": collection, "conversation_id": conversation}
        return chat_events(self.url, body, self.keys[key_id])

    def turns(self, scope: str, conversation_id: str) -> list[str]:
        """The questions of a conversation as the gateway keeps it in Redis."""
        raw = self.redis.lrange(f"ragline:conv:{scope}:{conversation_id}", 0, -1)
        return [orjson.loads(item)["question"] for item in raw]

    def conversation_keys(self, conversation_id: str) -> set[str]:
        return set(self.redis.scan_iter(match=f"ragline:conv:*:{conversation_id}"))


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("security")
    keys = write_keys(tmp / "keys.json", ENTRIES)
    env = gateway_env(
        stack.config,
        api_keys_file=str(tmp / "keys.json"),
        cache_ttl_s="0",
        max_tokens="24",
        auth_failure_limit=str(AUTH_FAILURE_LIMIT),
        log_level="debug",
    )
    with running_service("gateway-security", "ragline_gateway", env, tmp / "logs") as svc:
        g = Gateway(svc, keys, stack.config.redis_port)
        for collection, doc in DOCS.items():
            admin = f"{collection[:4]}-admin"
            r = g.call("POST", f"/api/collections/{collection}/documents", admin,
                       json={"documents": [doc]})  # fmt: skip
            assert r.status_code == 200, r.text
        yield g
        g.redis.close()


def from_address(address: str, **kw: Any) -> httpx.Client:
    """A client whose connections come from `address` (any of 127.0.0.0/8 on Linux): a
    peer of its own, as another machine would be."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30, **kw)


# --- conversation memory --------------------------------------------------------------


def test_another_keys_conversation_id_reaches_none_of_its_history(gw: Gateway) -> None:
    conversation = str(uuid.uuid4())
    eng_scope, sales_scope = "seca:seca-eng:seca_eng", "seca:seca-sales:seca_sales"
    first = gw.ask("seca-eng", "seca_eng", QUESTION, conversation)
    assert {s["doc_id"] for s in event(first, "sources")["sources"]} == {"falcon"}
    # Written once the answer is done; read back as the gateway keeps it.
    poll(lambda: gw.turns(eng_scope, conversation) == [QUESTION], 10, "the first turn is kept")

    # seca-sales, same tenant, sends the same conversation id: a conversation of its own.
    sales = gw.ask("seca-sales", "seca_sales", FOLLOW_UP, conversation)
    done = event(sales, "done")
    assert "search_query" not in done, done  # no history: searched as asked
    assert event(sales, "meta")["conversation_id"] == conversation
    assert "7431" not in "".join(e.data["text"] for e in sales if e.name == "token")
    poll(lambda: gw.turns(sales_scope, conversation) == [FOLLOW_UP], 10, "its own turn is kept")
    assert gw.turns(eng_scope, conversation) == [QUESTION]  # seca-eng's is unchanged

    # The OpenAI route with Open WebUI's chat id: history comes in `messages`; memory is
    # neither read nor written, for any key.
    body = {"model": "seca_sales", "messages": [{"role": "user", "content": FOLLOW_UP}]}
    webui = {"x-openwebui-chat-id": conversation, "x-openwebui-user-id": "u1"}
    r = gw.call("POST", "/v1/chat/completions", "seca-sales", headers=webui, json=body)
    assert r.status_code == 200, r.text
    assert "7431" not in r.json()["choices"][0]["message"]["content"]

    # seca-eng itself, in its other collection: no history from seca_eng either.
    ops = gw.ask("seca-eng", "seca_ops", FOLLOW_UP, conversation)
    assert "search_query" not in event(ops, "done")

    # In the collection it started in, it is a follow-up, searched with the question before.
    eng = gw.ask("seca-eng", "seca_eng", FOLLOW_UP, conversation)
    assert event(eng, "done")["search_query"] == f"{QUESTION} {FOLLOW_UP}"
    poll(lambda: gw.turns(eng_scope, conversation) == [QUESTION, FOLLOW_UP], 10, "follow-up kept")
    assert gw.conversation_keys(conversation) == {
        f"ragline:conv:{scope}:{conversation}"
        for scope in (eng_scope, sales_scope, "seca:seca-eng:seca_ops")
    }


def test_another_tenants_key_reaches_none_of_the_history(gw: Gateway) -> None:
    conversation = str(uuid.uuid4())
    gw.ask("seca-eng", "seca_eng", QUESTION, conversation)
    poll(lambda: gw.turns("seca:seca-eng:seca_eng", conversation), 10, "the first turn is kept")
    other = gw.ask("secg-admin", "secg_docs", FOLLOW_UP, conversation)
    assert "search_query" not in event(other, "done")
    assert gw.turns("seca:seca-eng:seca_eng", conversation) == [QUESTION]


# --- rate limits on every authenticated route -----------------------------------------


def test_a_flood_of_reads_meets_the_keys_call_rate(gw: Gateway) -> None:
    reads = ["/v1/models", "/api/collections", "/api/jobs", f"/api/jobs/{'0' * 32}"]
    allowed = 2 * CALL_RATE_MULTIPLIER
    statuses = [gw.call("GET", reads[i % len(reads)], "seca-reader").status_code
                for i in range(allowed)]  # fmt: skip
    assert set(statuses) <= {200, 404}, statuses  # 404: the job that is not there
    for path in reads:  # the window is full, whatever is read
        r = gw.call("GET", path, "seca-reader")
        assert_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "call rate" in r.json()["error"]["message"]
    # Answers are refused too (every call counts), and other keys are not affected.
    r = gw.call("POST", "/api/chat", "seca-reader", json={"message": QUESTION})
    assert_error(r, 429, "rate_limited")
    assert gw.call("GET", "/v1/models", "seca-sales").status_code == 200


def assert_auth_throttled(response: httpx.Response) -> None:
    assert_error(response, 429, "rate_limited")
    assert "failed authentications" in response.json()["error"]["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_a_flood_of_failed_authentication_is_slowed_for_that_client(gw: Gateway) -> None:
    wrong = {"authorization": "Bearer rl-" + "0" * 64}
    valid = bearer(gw.keys["seca-sales"])
    # The attacker also claims to be the victim in X-Forwarded-For: from a peer that is not
    # a trusted proxy the header is not believed.
    with from_address("127.0.0.2") as attacker, from_address("127.0.0.3") as victim:
        for _ in range(AUTH_FAILURE_LIMIT):
            r = attacker.get(f"{gw.url}/v1/models",
                             headers={**wrong, "x-forwarded-for": "127.0.0.3"})  # fmt: skip
            assert_error(r, 401, "unauthorized")
        assert_auth_throttled(attacker.get(f"{gw.url}/v1/models", headers=wrong))
        # Its further tries are refused before any key is looked at: a right one too, and
        # on every authenticated route.
        assert_auth_throttled(attacker.get(f"{gw.url}/v1/models", headers=valid))
        assert_auth_throttled(
            attacker.post(f"{gw.url}/api/chat", headers=valid, json={"message": QUESTION})
        )
        assert attacker.get(f"{gw.url}/healthz").status_code == 200  # unauthenticated
        # Another client: its key works, and its own failures are its own (a 401).
        assert victim.get(f"{gw.url}/v1/models", headers=valid).status_code == 200
        assert_error(victim.get(f"{gw.url}/v1/models", headers=wrong), 401, "unauthorized")


def test_through_a_trusted_proxy_each_forwarded_client_counts_alone(gw: Gateway) -> None:
    """The peer 127.0.0.1 is a trusted proxy (TRUSTED_PROXIES' default): the client is the
    last address of X-Forwarded-For that is not one."""
    wrong = {"authorization": "Bearer rl-" + "1" * 64}
    valid = bearer(gw.keys["seca-sales"])
    attacker = {"x-forwarded-for": "203.0.113.50, 198.51.100.7"}  # spoofed, then real
    for _ in range(AUTH_FAILURE_LIMIT):
        assert_error(gw.call("GET", "/v1/models", headers={**wrong, **attacker}), 401,
                     "unauthorized")  # fmt: skip
    assert_auth_throttled(gw.call("GET", "/v1/models", headers={**valid, **attacker}))
    # Not the spoofed address, not another client, not the proxy itself.
    for forwarded in ("203.0.113.50", "198.51.100.8", None):
        headers = {**valid, **({"x-forwarded-for": forwarded} if forwarded else {})}
        assert gw.call("GET", "/v1/models", headers=headers).status_code == 200, forwarded


@contextmanager
def nginx_in_front(gw: Gateway, prefix: Path) -> Iterator[str]:
    port = free_port()
    proc = nginx(port, f"127.0.0.1:{gw.port}", prefix, REPO_ROOT / "web")
    proc.start()
    try:
        proc.wait_ready(30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_behind_nginx_the_failures_count_per_client(gw: Gateway, tmp_path: Path) -> None:
    wrong = {"authorization": "Bearer rl-" + "2" * 64}
    valid = bearer(gw.keys["seca-sales"])
    with (
        nginx_in_front(gw, tmp_path / "nginx") as url,
        from_address("127.0.0.4") as attacker,
        from_address("127.0.0.5") as other,
    ):
        spoof = {"x-forwarded-for": "127.0.0.5"}  # nginx appends the real address
        for _ in range(AUTH_FAILURE_LIMIT):
            assert_error(attacker.get(f"{url}/v1/models", headers={**wrong, **spoof}), 401,
                         "unauthorized")  # fmt: skip
        assert_auth_throttled(attacker.get(f"{url}/v1/models", headers=valid))
        assert other.get(f"{url}/v1/models", headers=valid).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=valid, timeout=30).status_code == 200


# --- request heads ----------------------------------------------------------------------


def raw_exchange(port: int, head: bytes) -> bytes:
    """Sends `head` (however large) while reading the answer, to the connection's end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sent: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(head)
            except OSError as exc:  # the gateway may close before it has read it all
                sent.append(exc)

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        writer.join(30)
    return answer


def assert_431_envelope(status_line_and_rest: bytes) -> None:
    head, _, body = status_line_and_rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head[:200]
    headers = dict(
        line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
    )  # fmt: skip
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["message"]
    assert error["request_id"] == headers[b"x-request-id"].decode()


def test_an_8_mb_header_is_431_json(gw: Gateway) -> None:
    head = (b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n"
            + b"X-Huge: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n")  # fmt: skip
    assert_431_envelope(raw_exchange(gw.port, head))
    # Also when the header is the Authorization a client would send.
    head = (
        b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
        + b"b" * (1024 * 1024)
        + b"\r\n\r\n"
    )
    assert_431_envelope(raw_exchange(gw.port, head))
    assert gw.call("GET", "/v1/models", "seca-sales").status_code == 200  # still serving


def test_two_thousand_headers_are_431_json(gw: Gateway) -> None:
    headers = {f"x-header-{i}": "v" for i in range(2000)}
    r = gw.call("GET", "/v1/models", "seca-sales", headers=headers)
    assert r.status_code == 431
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "request_header_fields_too_large"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    # Ordinary requests are untouched, with their usual few headers.
    ordinary = {f"x-header-{i}": "v" * 100 for i in range(40)}
    assert gw.call("GET", "/v1/models", "seca-sales", headers=ordinary).status_code == 200


# --- names with a trailing newline ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "key_id", "body", "status"),
    [
        ("POST", "/v1/chat/completions", "secg-admin",
         {"model": "secg_docs\n", "messages": [{"role": "user", "content": QUESTION}]}, 404),
        ("POST", "/v1/chat/completions", "secg-admin",
         {"model": "ragline", "collection": "secg_docs\n",
          "messages": [{"role": "user", "content": QUESTION}]}, 422),
        ("POST", "/v1/chat/completions", "secg-admin",
         {"model": "ragline", "conversation_id": "c1\n",
          "messages": [{"role": "user", "content": QUESTION}]}, 422),
        ("POST", "/api/chat", "secg-admin", {"message": QUESTION, "collection": "secg_docs\n"},
         422),
        ("POST", "/api/chat", "secg-admin", {"message": QUESTION, "conversation_id": "c1\n"},
         422),
        # In a path, a control character is refused before anything else (400).
        ("POST", "/api/collections/secg_docs%0A/documents", "secg-admin",
         {"documents": [{"id": "d", "text": "x"}]}, 400),
        ("GET", f"/api/jobs/{'0' * 32}%0A", "secg-admin", None, 400),
    ],
)  # fmt: skip
def test_a_trailing_newline_is_not_a_name(
    gw: Gateway, method: str, path: str, key_id: str, body: Any, status: int
) -> None:
    r = gw.call(method, path, key_id, **({"json": body} if body is not None else {}))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"]


def test_a_trailing_newline_deletes_no_document(gw: Gateway) -> None:
    """Starlette routes `/documents/kestrel%0A` as the document `kestrel` (its `{:path}`
    parameters match `.*$`): the gateway refuses the path instead."""
    r = gw.call("DELETE", "/api/collections/secg_docs/documents/kestrel%0A", "secg-admin")
    assert_error(r, 400, "invalid_path")
    r = gw.call("DELETE", "/api/collections/secg_docs/documents/kestrel%00", "secg-admin")
    assert_error(r, 400, "invalid_path")
    events = chat_events(
        gw.url, {"message": "Who keeps Project Kestrel?", "collection": "secg_docs"},
        gw.keys["secg-admin"],
    )  # fmt: skip
    assert "kestrel" in {s["doc_id"] for s in event(events, "sources")["sources"]}


# --- what the gateway serves, and whether it starts --------------------------------------


def test_docs_are_off_with_keys_and_metrics_stay(gw: Gateway) -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert_error(gw.call("GET", path), 404, "not_found")
        assert_error(gw.call("GET", path, "secg-admin"), 404, "not_found")
    r = gw.call("GET", "/metrics")
    assert r.status_code == 200 and "ragline_" in r.text


def test_docs_are_on_without_keys(stack: Stack, tmp_path: Path) -> None:
    env = gateway_env(stack.config, allow_anonymous="true")
    with running_service("gateway-anonymous-docs", "ragline_gateway", env, tmp_path) as svc:
        assert httpx.get(f"{svc.url}/openapi.json", timeout=10).json()["paths"]
        assert httpx.get(f"{svc.url}/docs", timeout=10).status_code == 200


@pytest.mark.parametrize("source", ["file", "env"])
def test_a_keys_source_with_no_keys_refuses_to_start(
    stack: Stack, tmp_path: Path, source: str
) -> None:
    """ALLOW_ANONYMOUS=true does not make an emptied keys file an open gateway."""
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, [])
    settings = (
        {"api_keys_file": str(keys_file)} if source == "file" else {"api_keys": '{"keys": []}'}
    )
    env = gateway_env(stack.config, allow_anonymous="true", **settings)
    with pytest.raises(ProcessFailed) as failed:
        with running_service("gateway-no-keys", "ragline_gateway", env, tmp_path, 60):
            pass
    message = str(failed.value)
    assert "exited with 1" in message, message
    assert "gateway not started: no API keys configured" in message
    assert "holds no keys" in message


# --- the same rules in process ------------------------------------------------------------


def test_failed_authentication_throttle_forgets_with_its_window() -> None:
    from ragline_common.errors import ApiError
    from ragline_gateway.auth import FailedAuthThrottle

    throttle = FailedAuthThrottle(limit=2, window_s=0.3)
    throttle.failed("198.51.100.1")
    throttle.check("198.51.100.1")  # one failure: still let in
    throttle.failed("198.51.100.1")
    with pytest.raises(ApiError) as refused:
        throttle.check("198.51.100.1")
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    throttle.check("198.51.100.2")  # another client

    def let_in() -> bool:
        try:
            throttle.check("198.51.100.1")
        except ApiError:
            return False
        return True

    poll(let_in, 5, "the client is let in again once its failures leave the window")
    assert FailedAuthThrottle(limit=0, window_s=60).retry_after("x") is None  # off


def test_trusted_proxies_are_checked_at_start() -> None:
    from ragline_gateway.auth import check_trusted_proxies

    assert check_trusted_proxies(["127.0.0.1", "::1", "10.0.0.0/8"])
    for bad in ("10.0.0.1/8", "nginx", "300.1.1.1"):
        with pytest.raises(ValueError, match="trusted_proxies"):
            check_trusted_proxies([bad])
