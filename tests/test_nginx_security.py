"""nginx facing the internet: the request id, its own error pages, slow clients.

- A caller's X-Request-ID is kept only when the services would keep it too
  (ragline_common.middleware); anything else (quotes, braces, backslashes, spaces,
  non-ASCII, over 128 characters) is replaced by nginx's own id. The one id is in the
  error body, its X-Request-ID header, the access log line and the header the gateway
  gets: a crafted id can neither rewrite the JSON envelope nor make the logs disagree.
- Every error nginx makes itself (400, 404, 405, 413, 414, 500, 501, 505; 502/503/504 in
  test_nginx_errors) is the JSON envelope with the gateway's security headers.
- A client that sends half a header (or half a body) and then nothing is closed once the
  header (body) timeout passes, and 50 of them do not keep a normal request from being
  answered; an SSE stream idle for longer than every client timeout is not cut.

The nginx here is the stack's (nginx_helpers.running_nginx) in front of a small upstream
that stands in for the gateway: it echoes the request ids it got and streams SSE with an
idle gap. Where a test needs a timeout short enough to wait for, the rendered directive is
rewritten (the production values are checked as written).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import selectors
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from ragline_cli.processes import free_port
from ragline_cli.stack import REPO_ROOT
from ragline_common.middleware import RequestContextMiddleware

from nginx_helpers import (
    SAFE_ID,
    SECURITY_HEADERS,
    Nginx,
    assert_envelope,
    logged_request_ids,
    raw_exchange,
    running_nginx,
)

TEMPLATE = REPO_ROOT / "nginx" / "nginx.conf.template"
K8S_WEB_CONF = REPO_ROOT / "deploy" / "k8s" / "base" / "web" / "nginx.conf"
# The short timeouts of the `short` nginx (seconds) and how long a stream stays idle there.
SHORT_TIMEOUT_S = 2
SSE_GAP_S = SHORT_TIMEOUT_S + 1.5
CLOSE_WITHIN_S = SHORT_TIMEOUT_S + 10  # generous: the machine may be busy
SLOW_CLIENTS = 50
SSE_PATHS = ("/api/chat", "/v1/chat/completions")

CRAFTED_IDS: list[bytes] = [
    b'a"b',
    b'","code":"pwned',
    b'x"},"request_id":"forged',
    b"{}",
    b"a\\b",
    b"a b",
    b"<script>alert(1)</script>",
    b"a,b",
    b"a;b=c",
    b"x" * 129,
    b"x" * 4000,
    "ünïcødé-🙂".encode(),
    "\u2028\u2029".encode(),
    b"\x7f",
    b"",
]
KEPT_IDS = [b"my-id.42", b"trace:00f067aa0ba902b7", b"a" * 128, b"A_b-c.d:e"]


class _Upstream(http.server.BaseHTTPRequestHandler):
    """The gateway's part: on the SSE paths a stream with an idle gap; elsewhere the request
    ids it received, echoed in the body and (as the gateway does) in X-Request-ID."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.path in SSE_PATHS:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: first\n\n")
            self.wfile.flush()
            threading.Event().wait(SSE_GAP_S)  # the idle stream under test, not a sync
            self.wfile.write(b"data: second\n\n")
            return
        ids = self.headers.get_all("x-request-id") or []
        data = json.dumps({"path": self.path, "request_ids": ids}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if ids:
            self.send_header("x-request-id", ids[0])
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Nginx]:
    """The stack's nginx as rendered, in front of the upstream."""
    with running_nginx(tmp_path_factory.mktemp("nginx-security"), upstream_port) as running:
        yield running


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Nginx]:
    """The same with every client timeout cut to SHORT_TIMEOUT_S."""
    s = f"{SHORT_TIMEOUT_S}s"
    replace = {
        "client_header_timeout 10s;": f"client_header_timeout {s};",
        "client_body_timeout   30s;": f"client_body_timeout {s};",
        "send_timeout          60s;": f"send_timeout {s};",
        "keepalive_timeout     65s;": f"keepalive_timeout {s};",
    }
    tmp = tmp_path_factory.mktemp("nginx-security-short")
    with running_nginx(tmp, upstream_port, replace) as running:
        yield running


def _request(method: str, target: str, request_id: bytes | None, extra: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: ragline.test\r\n".encode()
    if request_id is not None:
        head += b"X-Request-ID: " + request_id + b"\r\n"
    return head + extra + b"Connection: close\r\n\r\n"


# --- the request id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "extra", "status", "code"),
    [
        ("POST", "/api/chat", b"Content-Length: 300000\r\n", 413, "payload_too_large"),
        ("GET", "/metrics", b"", 404, "not_found"),
        ("GET", "/api/..%2Findex.html", b"", 400, "bad_request"),
    ],
    ids=["413", "404", "400"],
)
@pytest.mark.parametrize("crafted", CRAFTED_IDS, ids=[str(n) for n in range(len(CRAFTED_IDS))])
def test_a_crafted_request_id_cannot_rewrite_an_error_body(
    plain: Nginx, crafted: bytes, method: str, path: str, extra: bytes, status: int, code: str
) -> None:
    case = f"{path}?case={CRAFTED_IDS.index(crafted)}"
    response = raw_exchange(plain.url, _request(method, case, crafted, extra))
    body = json.loads(response.content)  # strict JSON, the whole body
    assert set(body) == {"error"}
    error = assert_envelope(response, status, code)  # the id is safe, body and header agree
    assert error["request_id"].encode() != crafted
    assert error["message"] and "pwned" not in response.text and "forged" not in response.text
    assert logged_request_ids(plain.access_log, f"{method} {case} HTTP/1.1") == [
        error["request_id"]
    ]


@pytest.mark.parametrize("kept", KEPT_IDS, ids=[i.decode()[:20] for i in KEPT_IDS])
def test_a_good_request_id_is_kept_in_the_body_header_and_log(plain: Nginx, kept: bytes) -> None:
    case = f"/metrics?kept={KEPT_IDS.index(kept)}"
    response = raw_exchange(plain.url, _request("GET", case, kept))
    assert assert_envelope(response, 404, "not_found")["request_id"] == kept.decode()
    assert logged_request_ids(plain.access_log, f"GET {case} HTTP/1.1") == [kept.decode()]


ALL_IDS = [*CRAFTED_IDS, *KEPT_IDS]


@pytest.mark.parametrize("sent", ALL_IDS, ids=[str(n) for n in range(len(ALL_IDS))])
def test_the_gateway_gets_the_id_nginx_logs(plain: Nginx, sent: bytes) -> None:
    case = f"/api/echo?case={ALL_IDS.index(sent)}"
    response = raw_exchange(plain.url, _request("GET", case, sent))
    assert response.status_code == 200, response.text
    received = response.json()["request_ids"]
    assert len(received) == 1 and SAFE_ID.fullmatch(received[0]), received
    assert (received[0].encode() == sent) == (sent in KEPT_IDS)
    assert response.headers["x-request-id"] == received[0]
    assert logged_request_ids(plain.access_log, f"GET {case} HTTP/1.1") == received


def test_two_request_ids_reach_the_gateway_as_one(plain: Nginx) -> None:
    extra = b'X-Request-ID: "forged\r\n'
    response = raw_exchange(plain.url, _request("GET", "/api/echo?two", b"first-1", extra))
    received = response.json()["request_ids"]
    assert len(received) == 1 and SAFE_ID.fullmatch(received[0]), received
    assert logged_request_ids(plain.access_log, "GET /api/echo?two HTTP/1.1") == received


def _kept_by_the_services(request_id: bytes) -> bool:
    """Whether the services' request-id middleware keeps `request_id` (run in-process)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call() -> str:
        transport = httpx.ASGITransport(app=RequestContextMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            answer = await client.get("/x", headers=[(b"x-request-id", request_id)])
            return answer.headers["x-request-id"]

    return asyncio.run(call()).encode() == request_id


def test_nginx_and_the_services_keep_the_same_ids(plain: Nginx) -> None:
    """Else the gateway would replace an id nginx kept, and the two logs would disagree."""
    candidates = [*CRAFTED_IDS, *KEPT_IDS, b"-", b".", b":", b"a/b", b"a%20b", b"a+b", b"a=b"]
    for n, sent in enumerate(candidates):
        if not sent:
            continue  # absent to the services: they make their own, as nginx does
        response = raw_exchange(plain.url, _request("GET", f"/api/echo?agree={n}", sent))
        kept_by_nginx = response.json()["request_ids"] == [sent.decode("latin-1")]
        assert kept_by_nginx == _kept_by_the_services(sent), sent


# --- nginx's own error pages -----------------------------------------------------------------

OWN_ERRORS = [
    ("request_line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("no_host", b"GET /api/chat HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("bad_host", b"GET /api/chat HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "bad_request"),
    (
        "header_too_large",  # nginx's 494, answered as a 400
        b"GET /api/chat HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    ("dot_dot", _request("GET", "/api/..%2Findex.html", None), 400, "bad_request"),
    ("metrics", _request("GET", "/metrics", None), 404, "not_found"),
    ("trace", _request("TRACE", "/api/chat", None), 405, "method_not_allowed"),
    (
        "body_too_large",
        _request("POST", "/api/chat", None, b"Content-Length: 300000\r\n"),
        413,
        "payload_too_large",
    ),
    ("uri_too_long", _request("GET", "/api/" + "a" * 20000, None), 414, "uri_too_long"),
    (
        "transfer_encoding",
        _request("POST", "/api/chat", None, b"Transfer-Encoding: gzip\r\n"),
        501,
        "not_implemented",
    ),
    (
        "http_version",
        b"GET /api/chat HTTP/2.0\r\nHost: x\r\n\r\n",
        505,
        "http_version_not_supported",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [case[1:] for case in OWN_ERRORS],
    ids=[case[0] for case in OWN_ERRORS],
)
def test_every_error_nginx_makes_is_the_envelope_with_security_headers(
    plain: Nginx, request_bytes: bytes, status: int, code: str
) -> None:
    response = raw_exchange(plain.url, request_bytes)
    assert_envelope(response, status, code)
    assert "retry-after" not in response.headers


def test_nginx_failing_itself_is_a_json_500(tmp_path: Path) -> None:
    """A body past the 16k buffer goes to a temp file; with its folder gone, nginx fails."""
    with running_nginx(tmp_path, free_port()) as running:
        shutil.rmtree(running.prefix / "tmp" / "client_body")
        response = httpx.post(f"{running.url}/api/chat", content=b"x" * 64_000, timeout=10)
    assert_envelope(response, 500, "internal_error")


def test_a_missing_gateway_is_a_json_503_with_security_headers(tmp_path: Path) -> None:
    with running_nginx(tmp_path, free_port()) as running:
        response = httpx.get(f"{running.url}/v1/models", timeout=10)
    assert_envelope(response, 503, "gateway_unavailable")
    assert int(response.headers["retry-after"]) > 0


def test_the_web_page_keeps_its_own_headers(plain: Nginx) -> None:
    """The page's HTML errors are nginx's, with the page's headers (its CSP included)."""
    response = httpx.get(f"{plain.url}/no-such-page.html", timeout=10)
    assert response.status_code == 404
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in response.headers["content-security-policy"]


# --- slow clients ----------------------------------------------------------------------------


def _open_slow(nginx: Nginx, count: int, half: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(nginx.address, timeout=5)
        sock.sendall(half)
        socks.append(sock)
    return socks


def _wait_closed(socks: list[socket.socket], within: float) -> tuple[int, list[bytes]]:
    """Wait until nginx has closed every socket (end of stream or reset); how many it left
    open after `within` seconds, and what each got."""
    received = {sock: bytearray() for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while selector.get_map():  # at least one look, even with `within` 0
            left = max(0.0, deadline - time.monotonic())
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                else:
                    selector.unregister(sock)
            if time.monotonic() >= deadline:
                break
        return len(selector.get_map()), [bytes(data) for data in received.values()]


def _closed_quietly(data: bytes) -> bool:
    """What a timed-out client may get: nothing (nginx closes) or a 408."""
    return data == b"" or data.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(
    "half",
    [
        b"GET /api/chat HTTP/1.1\r\nHo",  # half a header
        b"",  # connected, nothing sent
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",  # half a body
    ],
    ids=["header", "nothing", "body"],
)
def test_a_slow_client_is_closed(short: Nginx, half: bytes) -> None:
    socks = _open_slow(short, 1, half)
    try:
        still_open, received = _wait_closed(socks, CLOSE_WITHIN_S)
        assert still_open == 0, f"not closed within {CLOSE_WITHIN_S} s"
        assert _closed_quietly(received[0]), received[0][:200]
    finally:
        for sock in socks:
            sock.close()


def test_slow_clients_do_not_stop_a_normal_request(plain: Nginx) -> None:
    """50 half headers held open (production timeouts: they are still waiting) while a
    normal request is answered at once."""
    socks = _open_slow(plain, SLOW_CLIENTS, b"GET /api/chat HTTP/1.1\r\nHost: x\r\nX-A: ")
    try:
        started = time.monotonic()
        response = httpx.get(f"{plain.url}/api/echo?normal", timeout=5)
        assert response.status_code == 200 and time.monotonic() - started < 5
        still_open, _ = _wait_closed(socks, 0)
        assert still_open == SLOW_CLIENTS  # the held ones were not what let it through
    finally:
        for sock in socks:
            sock.close()


def test_a_slow_loris_is_closed_and_normal_requests_go_on(short: Nginx) -> None:
    socks = _open_slow(short, SLOW_CLIENTS, b"GET /api/chat HTTP/1.1\r\nHost: x\r\nX-A: ")
    try:
        assert httpx.get(f"{short.url}/api/echo?during", timeout=5).status_code == 200
        still_open, received = _wait_closed(socks, CLOSE_WITHIN_S)
        assert still_open == 0, f"{still_open} of {SLOW_CLIENTS} not closed"
        assert all(_closed_quietly(data) for data in received)
        assert httpx.get(f"{short.url}/api/echo?after", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("path", SSE_PATHS)
def test_an_idle_stream_outlives_every_client_timeout(short: Nginx, path: str) -> None:
    """Frames relayed at once, and a gap longer than the header, body, send and keep-alive
    timeouts does not cut the stream (proxy_read_timeout governs it)."""
    frames: list[tuple[float, str]] = []
    started = time.monotonic()
    with httpx.stream("POST", f"{short.url}{path}", json={}, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                frames.append((time.monotonic() - started, line))
    assert [line for _, line in frames] == ["data: first", "data: second"]
    assert frames[0][0] < SSE_GAP_S <= frames[1][0] + 0.1  # not buffered until the end


# --- the configuration as written --------------------------------------------------------------


def _directive(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m)?", value.strip())
    assert match, value
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("conf", [TEMPLATE, K8S_WEB_CONF], ids=["template", "k8s-web"])
def test_client_timeouts_are_set_and_the_streams_untouched(conf: Path) -> None:
    text = conf.read_text()
    limits = {
        "client_header_timeout": 15,
        "client_body_timeout": 60,
        "send_timeout": 120,
        "keepalive_timeout": 75,
    }
    for name, most in limits.items():
        (value,) = _directive(text, name)
        assert 0 < _seconds(value) <= most, (name, value)
    assert _directive(text, "reset_timedout_connection") == ["on"]
    if conf == TEMPLATE:  # the SSE settings of ARCHITECTURE.md, for every API location
        assert _directive(text, "proxy_buffering") == ["off"]
        assert _directive(text, "proxy_read_timeout") == ["3600s"]
        assert _directive(text, "proxy_send_timeout") == ["3600s"]
        assert _directive(text, "proxy_http_version") == ["1.1"]


def _error_page_parts(text: str) -> list[str]:
    """The maps and the location that make the envelope, comments and `$$` normalised."""
    text = re.sub(r"#[^\n]*", "", text.replace("$$", "$"))
    parts = re.findall(
        r"map \$http_x_request_id \$ragline_request_id \{.*?default[^}]*\}", text, re.DOTALL
    )
    parts += re.findall(r"map \$status \$ragline_\w+ \{[^}]*\}", text)
    parts += re.findall(r"location = /_ragline_error \{.*?\n\s*\}", text, re.DOTALL)
    parts.append(" ".join(re.findall(r"error_page [^;]*;", text)[:2]))
    return [re.sub(r"\s+", " ", part) for part in parts]


def test_the_k8s_web_nginx_makes_the_same_error_pages() -> None:
    """deploy/k8s/base/web/nginx.conf answers the API while no gateway pod is ready: with
    the same envelope, codes and headers as nginx/nginx.conf.template."""
    template = _error_page_parts(TEMPLATE.read_text())
    assert len(template) == 6
    assert _error_page_parts(K8S_WEB_CONF.read_text()) == template
    for name in SECURITY_HEADERS:
        assert any(f"add_header {name} " in part.lower() for part in template), name
