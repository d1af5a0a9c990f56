"""The repo's nginx in a test: rendered from nginx/nginx.conf.template exactly as the stack
renders it (`ragline_cli.processes.nginx`), a directive or two rewritten where a test needs
a shorter timeout, run on a free loopback port in front of whatever gateway port it is
given; and what it answers read byte for byte, where httpx would refuse to send the request.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ragline_cli.processes import ManagedProcess, free_port, nginx, nginx_binary
from ragline_cli.stack import REPO_ROOT
from ragline_gateway.hardening import SECURITY_HEADERS as GATEWAY_SECURITY_HEADERS

READY_TIMEOUT_S = 30
# What the gateway puts on every answer; nginx's own error pages carry the same.
SECURITY_HEADERS = {name.decode(): value.decode() for name, value in GATEWAY_SECURITY_HEADERS}
# An id the services keep (ragline_common.middleware) and nginx's own ($request_id).
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Nginx:
    url: str
    prefix: Path

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@contextmanager
def running_nginx(
    tmp_path: Path, gateway_port: int, replace: dict[str, str] | None = None
) -> Iterator[Nginx]:
    """nginx in front of `gateway_port`; each key of `replace` (which the rendered config
    must hold) replaced by its value."""
    if nginx_binary() is None:
        pytest.fail("nginx not installed: run `make test` (it installs it)")
    port = free_port()
    prefix = tmp_path / f"nginx-{port}"
    proc: ManagedProcess = nginx(port, f"127.0.0.1:{gateway_port}", prefix, REPO_ROOT / "web")
    if replace:
        conf = prefix / "nginx.conf"
        text = conf.read_text()
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        conf.write_text(text)
    url = f"http://127.0.0.1:{port}"

    def listening() -> bool:  # /healthz needs the gateway: the web page does not
        try:
            return httpx.get(f"{url}/", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    proc.ready = listening
    proc.start()
    try:
        proc.wait_ready(READY_TIMEOUT_S)
        yield Nginx(url, prefix)
    finally:
        proc.stop()


def raw_exchange(url: str, request: bytes, timeout: float = 10) -> httpx.Response:
    """Send `request` as it is (no client normalises or refuses it) and read one response:
    its head, then Content-Length bytes of body (or all until nginx closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a whole response head: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = [(name.strip(), value.strip()) for name, _, value in fields]
        length = next((int(v) for n, v in headers if n.lower() == "content-length"), None)
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """`response` is nginx's (or the gateway's) JSON error envelope with the gateway's
    security headers; its `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] and error["request_id"] == response.headers["x-request-id"]
    assert SAFE_ID.fullmatch(error["request_id"]), error["request_id"]
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers.get(name))
    return error


def logged_request_ids(log: Path, request_line: str, within: float = 10) -> list[str]:
    """The `rid=` of every access-log line for `request_line` (e.g. `GET /metrics HTTP/1.1`),
    waited for: nginx writes the line after the answer has left."""
    deadline = time.monotonic() + within
    pattern = re.compile(rf'"{re.escape(request_line)}" \d+ \d+ rid=(\S+) ')
    while True:
        found = pattern.findall(log.read_text()) if log.exists() else []
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
