"""The errors nginx makes itself are the API's JSON envelope, never an HTML page.

Each test runs an nginx of its own, rendered from the repo's template exactly as the stack
renders it (`ragline_cli.processes.nginx`), in front of a gateway that is not there:

- a port where nothing listens (the gateway restarting: connection refused),
- a server that accepts and closes at once (a gateway dying mid-request),
- a server that accepts and never answers (a hung gateway; the rendered read timeout is
  cut from 3600 s to 1 s so the test need not wait an hour).

On every API path (/api, /v1, /healthz, /readyz) each is a 503 `gateway_unavailable`
envelope with `Retry-After`, nginx's request id and the gateway's security headers
(nginx_helpers.assert_envelope); malformed requests are a JSON 400,
`/metrics` and unknown bare API paths a JSON 404. The web page keeps its HTML. A small
echo server stands in for the gateway where what nginx forwards is checked (the Host with
its port, the bare `/api/collections` proxied rather than redirected, the gateway's own
errors passed through untouched).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ragline_cli.processes import free_port

from nginx_helpers import assert_envelope, raw_exchange, running_nginx
from service_helpers import raw_get

API_REQUESTS = [
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/api/collections", None),
    ("GET", "/api/jobs", None),
    ("GET", "/v1/models", None),
    ("POST", "/api/chat", {"message": "hello"}),
    ("POST", "/v1/chat/completions", {"model": "ragline", "messages": []}),
    ("POST", "/api/collections/default/documents", {"documents": []}),
]


class _Upstream:
    """A TCP server on a free loopback port that either closes each connection at once
    or holds it open without a byte (until `close`)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "close":
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        for conn in self.held:
            conn.close()


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it received; `/api/upstream-502` with the gateway's
    own 502 envelope (nginx must pass it through, not replace it)."""

    def _answer(self) -> None:
        if self.path == "/api/upstream-502":
            status, body = (
                502,
                {"error": {"code": "upstream_error", "message": "m", "request_id": "r"}},
            )
        else:
            status, body = (
                200,
                {"method": self.command, "path": self.path, "host": self.headers["host"]},
            )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _nginx(tmp_path: Path, gateway_port: int, read_timeout_s: int | None = None) -> Iterator[str]:
    """The stack's nginx; the read timeout cut from 3600 s where a test waits for it."""
    replace = None
    if read_timeout_s is not None:
        replace = {"proxy_read_timeout 3600s;": f"proxy_read_timeout {read_timeout_s}s;"}
    with running_nginx(tmp_path, gateway_port, replace) as running:
        yield running.url


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nginx-errors")


@pytest.fixture(scope="module", params=["refused", "close", "hang"])
def unreachable(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[str]:
    """nginx in front of a gateway that refuses, drops or never answers."""
    if request.param == "refused":
        with _nginx(module_tmp, free_port()) as url:
            yield url
        return
    upstream = _Upstream(request.param)
    try:
        read_timeout = 1 if request.param == "hang" else None
        with _nginx(module_tmp, upstream.port, read_timeout) as url:
            yield url
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def no_gateway(module_tmp: Path) -> Iterator[str]:
    """nginx with nothing listening behind it (the checks below never reach the gateway)."""
    with _nginx(module_tmp, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def echo(module_tmp: Path) -> Iterator[str]:
    """nginx in front of the echo server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with _nginx(module_tmp, server.server_address[1]) as url:
            yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(("method", "path", "body"), API_REQUESTS)
def test_an_unreachable_gateway_is_a_json_503_with_retry_after(
    unreachable: str, method: str, path: str, body: object
) -> None:
    response = httpx.request(method, f"{unreachable}{path}", json=body, timeout=30)
    assert_envelope(response, 503, "gateway_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["cache-control"] == "no-store"


def test_the_callers_request_id_is_kept_and_a_bad_one_replaced(unreachable: str) -> None:
    mine = httpx.get(f"{unreachable}/v1/models", headers={"x-request-id": "my-id.42"}, timeout=30)
    assert assert_envelope(mine, 503, "gateway_unavailable")["request_id"] == "my-id.42"
    # One the services would not accept either, and not safe inside a JSON string.
    bad = httpx.get(f"{unreachable}/v1/models", headers={"x-request-id": 'a"b'}, timeout=30)
    assert assert_envelope(bad, 503, "gateway_unavailable")["request_id"] != 'a"b'


def test_the_web_page_is_served_while_the_gateway_is_away(unreachable: str) -> None:
    response = httpx.get(f"{unreachable}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    "path",
    [
        "/api/..%2Findex.html",  # out of the API onto the web page
        "/api/..%2F..%2F..%2Fetc/passwd",  # above the root
        "/api/jobs/..%2F..%2Fetc",
        "/v1/%2e%2e/index.html",
        "/api/collections/x/documents/a/%2E%2E%2Fb",
        "/api/collections/x/documents/a/../b",
    ],
)
def test_a_dot_dot_segment_is_a_json_400(no_gateway: str, path: str) -> None:
    response = raw_get(no_gateway, path, {"x-request-id": "traversal-1"})
    error = assert_envelope(response, 400, "bad_request")
    # nginx refuses a path above the root before it reads the headers: then its own id.
    if not path.startswith("/api/..%2F..%2F"):
        assert error["request_id"] == "traversal-1"


def test_dots_inside_a_name_are_no_traversal(no_gateway: str) -> None:
    """`a..b` is a name, not a segment: it reaches the (absent) gateway."""
    response = httpx.get(f"{no_gateway}/api/collections/x/documents/a..b", timeout=30)
    assert_envelope(response, 503, "gateway_unavailable")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /api/chat HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /api/% HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["request_line", "header", "bad_percent"],
)
def test_a_malformed_request_is_a_json_400(no_gateway: str, request_bytes: bytes) -> None:
    assert_envelope(raw_exchange(no_gateway, request_bytes), 400, "bad_request")


def test_a_uri_too_long_is_a_json_414(no_gateway: str) -> None:
    response = httpx.get(f"{no_gateway}/api/collections/{'a' * 20000}", timeout=10)
    assert_envelope(response, 414, "uri_too_long")


def test_a_body_too_large_is_a_json_413(no_gateway: str) -> None:
    response = httpx.post(f"{no_gateway}/api/chat", content=b"x" * 300_000, timeout=10)
    assert_envelope(response, 413, "payload_too_large")


@pytest.mark.parametrize("path", ["/metrics", "/api", "/v1", "/_ragline_error"])
def test_no_endpoint_is_a_json_404(no_gateway: str, path: str) -> None:
    response = httpx.get(f"{no_gateway}{path}", timeout=10)
    assert_envelope(response, 404, "not_found")
    assert "retry-after" not in response.headers


def test_the_web_page_keeps_html_errors(no_gateway: str) -> None:
    response = httpx.get(f"{no_gateway}/no-such-page.html", timeout=10)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")


def test_the_host_reaches_the_gateway_with_its_port(echo: str) -> None:
    """The gateway builds absolute URLs (a redirect's Location) from the Host it gets."""
    seen = httpx.get(f"{echo}/api/jobs", timeout=10).json()
    assert seen["host"] == echo.removeprefix("http://")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/api/collections", "/api/collections/c/documents", "/v1/models"])
def test_api_paths_are_proxied_as_sent(echo: str, method: str, path: str) -> None:
    """The bare `/api/collections` included: no 301 to `/api/collections/`."""
    response = httpx.request(method, f"{echo}{path}", follow_redirects=False, timeout=10)
    assert response.status_code == 200, (response.status_code, response.headers.get("location"))
    assert response.json()["path"] == path and response.json()["method"] == method


def test_the_gateways_own_errors_pass_through(echo: str) -> None:
    response = httpx.get(f"{echo}/api/upstream-502", timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
