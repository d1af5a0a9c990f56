"""The gateway's own HTTP/1.1 transport for plain-HTTP upstreams (clients/http1.py), against
raw asyncio servers on loopback that write exact bytes: responses cut at every byte,
chunked bodies with extensions and trailers, kept-alive connections, upstreams that close
or hang at the worst moment, and the pool's bounds and timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from ragline_gateway.clients.http1 import READ_HIGH_WATER, HttptoolsTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"X-Folded: a\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"6;name=value\r\ndata: \r\n"
    b'B\r\n{"t": "hi"}\r\n'
    b'2;x;y="q"\r\n\n\n\r\n'
    b"0\r\nX-Trailer: done\r\nX-Other: 1\r\n\r\n"
)
CHUNKED_BODY = b'data: {"t": "hi"}\n\n'
SIZED = b"HTTP/1.1 201 Created\r\nContent-Length: 12\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello world!"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request: a Content-Length body or a chunked one."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")), 0)
    if b"transfer-encoding: chunked" not in lines:
        return head, await reader.readexactly(length) if length else b""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        body += (await reader.readexactly(size + 2))[:-2]
        if not size:
            return head, body


class Server:
    """A loopback server running `handler` per connection, counting connections and
    noticing the ones the client closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.client_closed = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_closed += 1
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head, body = await read_request(reader)
        self.heads.append(head)
        self.bodies.append(body)
        return head, body

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        """The handlers end as the client closes its connections; any left are cancelled
        (a handler that never returns), so that none outlives the test's loop."""
        self._server.close()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=1)
            for task in still:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def client(url: str, connections: int = 4, **limits: Any) -> httpx.AsyncClient:
    transport = HttptoolsTransport(httpx.Limits(max_connections=connections, **limits))
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=5)


def run(work: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(work(), 60))


async def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.005)


def keep_answering(
    server: Server, response: bytes, pieces: Callable[[bytes], list[bytes]]
) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            for piece in pieces(response):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)  # so that the client reads each piece on its own

    return handler


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "status", "body"),
    [(CHUNKED, 200, CHUNKED_BODY), (SIZED, 201, b"hello world!")],
    ids=["chunked", "content-length"],
)
def test_a_response_cut_at_every_byte_boundary_reads_the_same(
    response: bytes, status: int, body: bytes
) -> None:
    """Every way of cutting the response in two (CR and LF split apart, a chunk's size
    from its data, a trailer in two), then one byte at a time: the same status, headers and
    body each time, over one kept-alive connection throughout."""
    cuts = list(range(1, len(response)))

    async def work() -> None:
        cut = iter(cuts)
        server = Server(lambda r, w: None)  # replaced below: the server needs itself
        bytewise = [False]

        def pieces(data: bytes) -> list[bytes]:
            if bytewise[0]:
                return [data[i : i + 1] for i in range(len(data))]
            i = next(cut)
            return [data[:i], data[i:]]

        server.handler = keep_answering(server, response, pieces)
        async with server as url, client(url) as http:
            for _ in [*cuts, "bytewise"]:
                if _ == "bytewise":
                    bytewise[0] = True
                async with http.stream("GET", "/x") as r:
                    assert r.status_code == status
                    received = b"".join([c async for c in r.aiter_raw()])
                assert received == body, f"cut at {_}"
                if status == 200:
                    assert r.headers["content-type"] == "text/event-stream"
                    assert r.headers["x-folded"] == "a"
                    assert "x-trailer" not in r.headers  # trailers are read and dropped
                else:
                    assert r.headers.get_list("x-a") == ["1", "2"]
                    assert r.reason_phrase == "Created" and r.http_version == "HTTP/1.1"
            assert server.accepted == 1

    run(work)


def test_a_body_read_until_the_connection_closes_and_informational_answers_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: b\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"it")
        await writer.drain()

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            response = await http.get("/")
            assert (response.status_code, response.content) == (200, b"all of it")
            assert response.headers["x-a"] == "b"

    run(work)


def test_a_large_body_read_slower_than_it_arrives() -> None:
    big = bytes(range(256)) * (3 * READ_HIGH_WATER // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()
        await read_request(reader)  # the connection was kept
        writer.write(SIZED)
        await writer.drain()

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            async with http.stream("GET", "/big") as response:
                await asyncio.sleep(0.2)  # everything arrives; reading was paused meanwhile
                assert b"".join([c async for c in response.aiter_raw()]) == big
            assert (await http.get("/again")).content == b"hello world!"

    run(work)


def test_invalid_http_from_the_upstream_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        await writer.drain()
        await reader.read()

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/")

    run(work)


# --- requests --------------------------------------------------------------------------------


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _parts() -> AsyncIterator[bytes]:
    for part in (b"ab", b"", b"cde"):
        yield part


def test_request_bodies_as_bytes_as_an_iterator_with_its_length_and_chunked() -> None:
    server = Server(lambda r, w: None)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(SIZED)
            await writer.drain()

    server.handler = handler

    async def work() -> None:
        async with server as url, client(url) as http:
            await http.post("/json", json={"a": 1})
            # The LLM request: an iterator, with its Content-Length given.
            headers = {"content-length": "5", "accept-encoding": "identity"}
            await http.post("/sized", content=_once(b"12345"), headers=headers)
            await http.post("/chunked", content=_parts())
            await http.get("/none")
            with pytest.raises(httpx.LocalProtocolError):  # the length given is wrong
                await http.post("/bad", content=_once(b"123"), headers={"content-length": "5"})
            with pytest.raises(httpx.LocalProtocolError):  # a header injected
                await http.get("/", headers={"x-id": "a\r\nx-evil: 1"})
            await http.get("/last")

    run(work)
    json_head, sized_head, chunked_head, get_head = (h.lower() for h in server.heads[:4])
    assert json_head.startswith(b"post /json http/1.1\r\n")
    assert b"content-length: 7\r\n" in json_head and b"host: 127.0.0.1:" in json_head
    assert b"content-length: 5\r\n" in sized_head and b"transfer-encoding" not in sized_head
    assert b"accept-encoding: identity\r\n" in sized_head
    assert b"transfer-encoding: chunked\r\n" in chunked_head
    assert b"content-length" not in get_head and b"transfer-encoding" not in get_head
    assert server.bodies == [b'{"a":1}', b"12345", b"abcde", b"", b""]
    assert server.accepted == 2  # the connection the wrong length broke was not kept


# --- connections -----------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection_and_connection_close_is_honoured() -> None:
    server = Server(lambda r, w: None)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await server.request(reader)
            if b"/last" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                assert await reader.read() == b""  # the client closes its side
                server.client_closed += 1
                return
            writer.write(SIZED)
            await writer.drain()

    server.handler = handler

    async def work() -> None:
        async with server as url, client(url) as http:
            for i in range(20):
                assert (await http.get(f"/{i}")).status_code == 201
            assert server.accepted == 1
            assert (await http.get("/last")).content == b"ok"
            await wait_for(lambda: server.client_closed == 1, 5, "the client to close")
            assert (await http.get("/after")).status_code == 201
            assert server.accepted == 2

    run(work)


def test_an_idle_connection_the_upstream_closed_is_replaced_transparently() -> None:
    server = Server(lambda r, w: None)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(SIZED)  # keep-alive, and then closed all the same
        await writer.drain()

    server.handler = handler

    async def work() -> None:
        async with server as url, client(url) as http:
            assert (await http.get("/a")).status_code == 201
            transport = http._transport
            assert isinstance(transport, HttptoolsTransport)
            await wait_for(lambda: [c[3] for c in transport.connections()] == [0], 5,
                           "the closed idle connection to leave the pool")  # fmt: skip
            assert (await http.get("/b")).status_code == 201
            assert server.accepted == 2

    run(work)


def test_a_response_not_read_to_its_end_closes_its_connection() -> None:
    """As the gateway does when a client leaves mid-answer: the reading task cancelled,
    then the response closed. The upstream sees the connection close (for llm-svc: the
    generation stops) and the pool's place is free again."""
    server = Server(lambda r, w: None)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await server.request(reader)
        if b"/endless" not in head:
            writer.write(SIZED)
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"7\r\ndata: x\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    server.handler = handler

    async def work() -> None:
        async with server as url, client(url, connections=1) as http:
            response = await http.send(http.build_request("GET", "/endless"), stream=True)
            chunks = response.aiter_raw()
            assert (await anext(chunks)).startswith(b"data: x")

            async def read_on() -> None:
                async for _ in chunks:
                    pass

            reader = asyncio.create_task(read_on())
            await asyncio.sleep(0.05)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await response.aclose()
            await wait_for(lambda: server.client_closed == 1, 5, "the upstream to see it close")
            assert (await http.get("/next")).status_code == 201  # the one place is free
            assert server.accepted == 2

    run(work)


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart of it",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\npart of",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
    ids=["sized-body", "mid-chunk", "between-chunks", "mid-head", "nothing"],
)
def test_an_upstream_closing_mid_response_is_an_error_the_clients_map(sent: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(0.01)

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async with http.stream("GET", "/") as response:
                    async for _ in response.aiter_raw():
                        pass
            # The broken connection is not kept: the place it held is free again.
            assert [c[2:] for c in http._transport.connections()] == [(0, 0)]  # type: ignore[attr-defined]

    run(work)


def test_read_timeouts_before_the_head_and_mid_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/mid" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()
        await reader.read()  # then nothing more

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            for path in ("/head", "/mid"):
                started = time.monotonic()
                with pytest.raises(httpx.ReadTimeout):
                    await http.get(path, timeout=0.3)
                assert 0.25 < time.monotonic() - started < 3

    run(work)


def test_a_read_timeout_is_per_wait_not_for_the_whole_body() -> None:
    """A token every 0.1 s for 1 s under a 0.3 s read timeout: no timeout (the timer
    is kept per connection and moved on, not set per read)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def work() -> None:
        async with Server(handler) as url, client(url) as http:
            assert (await http.get("/", timeout=0.3)).content == b"x" * 10

    run(work)


def test_connection_refused() -> None:
    async def work() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with client(f"http://127.0.0.1:{port}") as http:
            with pytest.raises(httpx.ConnectError):
                await http.get("/")
            assert [c[2:] for c in http._transport.connections()] == [(0, 0)]  # type: ignore[attr-defined]

    run(work)


def test_pool_timeout_when_every_connection_is_busy_and_a_freed_one_is_handed_on() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/slow" in head:
                await release.wait()
            writer.write(SIZED)
            await writer.drain()

    async def work() -> None:
        server = Server(handler)
        async with server as url, client(url, connections=2) as http:
            slow = [asyncio.create_task(http.get("/slow")) for _ in range(2)]
            await wait_for(lambda: server.accepted == 2, 5, "two connections")
            with pytest.raises(httpx.PoolTimeout):
                await http.get("/fast", timeout=httpx.Timeout(5, pool=0.2))
            waiting = [asyncio.create_task(http.get(f"/fast{i}")) for i in range(3)]
            await asyncio.sleep(0.05)
            release.set()
            for response in await asyncio.gather(*slow, *waiting):
                assert response.status_code == 201
            assert server.accepted == 2  # the waiters took the connections put back

    run(work)


def test_https_is_not_spoken() -> None:
    async def work() -> None:
        async with client("https://127.0.0.1:1") as http:
            with pytest.raises(httpx.UnsupportedProtocol):
                await http.get("/")

    run(work)


def test_the_setting_chooses_the_transport_of_every_upstream_client() -> None:
    """RAGLINE_GATEWAY_UPSTREAM_HTTP: this transport by default, httpx's own on request."""
    from ragline_gateway.clients.llm import LlmClient
    from ragline_gateway.clients.reranker import RerankerClient
    from ragline_gateway.clients.retriever import RetrieverClient
    from ragline_gateway.settings import GatewaySettings

    for http, kind in (("httptools", HttptoolsTransport), ("httpcore", httpx.AsyncHTTPTransport)):
        settings = GatewaySettings(upstream_http=http)
        clients = [
            LlmClient.from_settings(settings, 2),
            RerankerClient.from_settings(settings, 2),
            *RetrieverClient("http://a:1,http://b:2", 2, upstream_http=http).replicas,
        ]
        for upstream in clients:
            assert isinstance(upstream.http._transport, kind)
    assert GatewaySettings.model_fields["upstream_http"].default == "httptools"
    assert isinstance(LlmClient("http://a:1", 1).http._transport, HttptoolsTransport)
    with pytest.raises(ValueError):
        GatewaySettings(upstream_http="h2")
