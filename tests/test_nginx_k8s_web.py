"""The Kubernetes chat-page nginx (deploy/k8s/base/web/nginx.conf), run here as shipped
but for its port, the page's folder and its temp paths.

It is also the Ingresses' default backend (deploy/k8s/base/ingress.yaml): while no gateway
pod is ready, ingress-nginx sends API requests to it, and they get the API's JSON envelope
(503 `gateway_unavailable` with Retry-After) rather than ingress-nginx's HTML page. The
kubelet's probe of /healthz still gets its "ok"; a public /healthz (ingress-nginx sets
X-Request-ID) the 503. Dot-dot paths are a JSON 400, /metrics a JSON 404; the page is HTML.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ragline_cli.processes import ManagedProcess, free_port, nginx_binary, nginx_command
from ragline_cli.stack import REPO_ROOT

from service_helpers import raw_get

CONF = REPO_ROOT / "deploy" / "k8s" / "base" / "web" / "nginx.conf"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = nginx_binary()
    if binary is None:
        pytest.fail("nginx not installed: run `make test` (it installs it)")
    prefix = tmp_path_factory.mktemp("k8s-web")
    port = free_port()
    text = CONF.read_text()
    # /tmp/ first: the repo itself may lie under /tmp/ (a CI clone).
    for old, new in {
        "/tmp/": f"{prefix}/",
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "/usr/share/ragline/web": str(REPO_ROOT / "web"),
        "access_log /dev/stdout;": f"access_log {prefix}/access.log;",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    argv = nginx_command(prefix, conf)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    proc = ManagedProcess("k8s-web-nginx", argv, prefix / "nginx.out", ready=ready).start()
    try:
        proc.wait_ready(30)
        yield url
    finally:
        proc.stop()


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"} and error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_the_page_and_the_probe(web: str) -> None:
    page = httpx.get(f"{web}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    probe = httpx.get(f"{web}/healthz", timeout=10)
    assert probe.status_code == 200 and probe.text == "ok\n"
    missing = httpx.get(f"{web}/no-such-page.html", timeout=10)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/api/collections"),
        ("GET", "/api"),
        ("POST", "/api/chat"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ],
)
def test_the_api_while_no_gateway_is_ready(web: str, method: str, path: str) -> None:
    """As ingress-nginx sends it to its default backend: with an X-Request-ID."""
    response = httpx.request(
        method, f"{web}{path}", headers={"x-request-id": "ingress-id-1"}, json={}, timeout=10
    )
    error = assert_envelope(response, 503, "gateway_unavailable")
    assert error["request_id"] == "ingress-id-1"
    assert int(response.headers["retry-after"]) > 0


def test_metrics_are_not_served_here(web: str) -> None:
    assert_envelope(httpx.get(f"{web}/metrics", timeout=10), 404, "not_found")


@pytest.mark.parametrize("path", ["/api/..%2Findex.html", "/x/%2e%2e/index.html", "/a/../app.js"])
def test_a_dot_dot_segment_is_a_json_400(web: str, path: str) -> None:
    response = raw_get(web, path)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "bad_request"
