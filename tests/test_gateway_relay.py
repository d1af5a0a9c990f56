"""The gateway's relay path, made lean for speed (docs/benchmarks.md), checked for
correctness: its own sockets under httpx (clients/network.py; its HTTP/1.1 transport,
clients/http1.py, has tests/test_gateway_http1.py), the SSE split of llm-svc's
stream (clients/llm.py), the answer feed (feed.py), and keepalive pings and the idle limit
end to end through a real gateway and llm-svc.

The socket tests talk to small asyncio HTTP servers in the test: they must misbehave on
cue (hang, close a kept-alive connection) in ways no service of ours does on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline_gateway.clients.http1 import HttptoolsTransport
from ragline_gateway.clients.llm import LlmClient, LlmStream
from ragline_gateway.clients.network import READ_HIGH_WATER, AsyncioBackend, upstream_transport
from ragline_gateway.feed import QUIET, Feed

from recording_llm import recording_llm
from service_helpers import gateway_env, running_service

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length) if length else b""


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (len(body), extra) + body


async def with_server(handler: Handler, work: Callable[[str], Awaitable[Any]]) -> Any:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await work(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def client(url: str, http: str = "httpcore") -> httpx.AsyncClient:
    """On `http`: this section tests network.py's sockets, which `httpcore` runs on."""
    return httpx.AsyncClient(base_url=url, transport=upstream_transport(url, LIMITS, http))


async def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.01)


# --- clients/network.py ------------------------------------------------------------------


def test_plain_http_upstreams_use_the_asyncio_backend_and_https_keeps_httpx_default() -> None:
    assert isinstance(upstream_transport("http://llm:8003", LIMITS), HttptoolsTransport)
    plain = upstream_transport("http://llm:8003", LIMITS, "httpcore")
    assert isinstance(plain._pool._network_backend, AsyncioBackend)  # see upstream_transport
    assert plain._pool._max_connections == 4
    for http in ("httptools", "httpcore"):
        tls = upstream_transport("https://llm:8003", LIMITS, http)
        assert isinstance(tls, httpx.AsyncHTTPTransport)
        assert not isinstance(tls._pool._network_backend, AsyncioBackend)
    with pytest.raises(ValueError):
        upstream_transport("http://llm:8003", LIMITS, "h2")


@pytest.mark.parametrize("http", ["httpcore", "httptools"])
def test_requests_reuse_one_kept_alive_connection(http: str) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                body = await read_request(reader)
                writer.write(answer(b'{"echo": %s}' % body))
                await writer.drain()
        except asyncio.IncompleteReadError:  # the client closed the connection
            writer.close()

    async def work(url: str) -> list[Any]:
        async with client(url, http) as c:
            return [(await c.post("/x", json={"n": i})).json() for i in range(20)]

    results = asyncio.run(with_server(handler, work))
    assert results == [{"echo": {"n": i}} for i in range(20)]
    assert connections == 1


def test_a_connection_the_upstream_closed_while_idle_is_replaced() -> None:
    """httpcore asks the stream whether an idle connection became readable (the peer's
    EOF): the backend must say so, or the next request goes out on a dead socket."""
    closed = asyncio.Event()
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(answer(b"{}"))
        await writer.drain()
        writer.close()  # despite keep-alive
        closed.set()

    async def work(url: str) -> int:
        async with client(url) as http:
            assert (await http.get("/a")).status_code == 200
            await closed.wait()
            pool = http._transport._pool  # type: ignore[attr-defined]
            await wait_for(lambda: all(c.has_expired() for c in pool.connections), 5,
                           "the closed connection to be seen")  # fmt: skip
            return (await http.get("/b")).status_code

    assert asyncio.run(with_server(handler, work)) == 200
    assert connections == 2


@pytest.mark.parametrize("http", ["httpcore", "httptools"])
def test_read_timeout_connect_error_and_a_body_larger_than_the_read_buffer(http: str) -> None:
    big = bytes(range(256)) * (3 * READ_HIGH_WATER // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = (await reader.readuntil(b"\r\n")).split()[1]
        await reader.readuntil(b"\r\n\r\n")
        if path == b"/hang":
            await reader.read()  # never answers
            return
        writer.write(answer(big))
        await writer.drain()

    async def work(url: str) -> None:
        async with client(url, http) as c:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/hang", timeout=0.3)
            assert time.monotonic() - started < 5
            async with c.stream("GET", "/big") as response:
                chunks = [c async for c in response.aiter_raw()]
            assert b"".join(chunks) == big

    asyncio.run(with_server(handler, work))

    async def refused() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with client(f"http://127.0.0.1:{port}", http) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/")

    asyncio.run(refused())


# --- clients/llm.py: server-sent events out of raw bytes ---------------------------------


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def sse_body(texts: list[str], newline: bytes = b"\n") -> bytes:
    frames = [b": a comment" + newline * 2]
    for i, text in enumerate(texts):
        chunk = {"choices": [{"delta": {"content": text}, "finish_reason": None}]}
        frames.append(b"event: x" + newline + b"id: %d" % i + newline)
        frames.append(b"data: " + orjson.dumps(chunk) + newline * 2)
    done = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"total_tokens": 9}}
    frames.append(b"data: " + orjson.dumps(done) + newline * 2)
    frames.append(b"data: [DONE]" + newline * 2 + b"data: after the end" + newline * 2)
    return b"".join(frames)


async def parsed(chunks: list[bytes]) -> list[tuple[str, str | None]]:
    stream = LlmStream(httpx.Response(200, stream=Chunks(chunks)))
    return [(d.text, d.finish_reason) async for d in stream.deltas()]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_sse_split_is_the_same_however_the_bytes_arrive(newline: bytes) -> None:
    texts = ["Hon", "ey", "bees\n", " dance ", "[1]", "é€😀"]
    body = sse_body(texts, newline)
    expected = [(t, None) for t in texts] + [("", "stop")]
    assert asyncio.run(parsed([body])) == expected  # all at once
    assert asyncio.run(parsed([body[i : i + 1] for i in range(len(body))])) == expected
    for cut in range(1, len(body), 7):  # every way of cutting it in two, CRLF split too
        assert asyncio.run(parsed([body[:cut], body[cut:]])) == expected


def test_the_generation_request_goes_with_a_content_length_not_chunked() -> None:
    """The prompt is sent as an iterator (so the request does not hold it for the whole
    answer) with its length given: llm-svc and vLLM get an ordinary request."""
    seen: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(
            line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if line
        )
        seen["headers"] = headers
        seen["body"] = orjson.loads(await reader.readexactly(int(headers["content-length"])))
        body = sse_body(["Hello"])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async def work(url: str) -> list[str]:
        llm = LlmClient(url, pool_size=2)
        try:
            stream = await llm.open_stream(
                [{"role": "user", "content": "Hi"}], model="m", sampling={"max_tokens": 5},
                connect_timeout=5, read_timeout=5,
            )  # fmt: skip
            texts = [d.text async for d in stream.deltas()]
            await stream.aclose()
            return texts
        finally:
            await llm.aclose()

    assert asyncio.run(with_server(handler, work)) == ["Hello", ""]
    assert "transfer-encoding" not in seen["headers"]
    assert seen["headers"]["accept-encoding"] == "identity"
    assert seen["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert seen["body"]["stream"] is True and seen["body"]["max_tokens"] == 5


# --- feed.py -------------------------------------------------------------------------------


def test_feed_says_quiet_after_its_interval_and_bounds_what_it_holds() -> None:
    async def run() -> None:
        feed: Feed[int] = Feed(2, quiet_after=0.2)
        started = time.monotonic()
        assert await feed.get() is QUIET  # nothing came
        assert time.monotonic() - started >= 0.19
        assert feed.put_nowait(1) and feed.put_nowait(2)
        assert not feed.put_nowait(3)  # full: dropped
        blocked = asyncio.create_task(feed.put(4))
        await wait_for(lambda: feed._putter is not None, 5, "the producer to wait")
        assert not blocked.done()  # the producer waits for the consumer
        assert await feed.get() == 1
        await asyncio.wait_for(blocked, 5)
        assert [await feed.get(), await feed.get()] == [2, 4]
        feed.close()

    asyncio.run(run())


def test_feed_hands_over_the_ready_items_of_a_kind_and_wakes_the_producer() -> None:
    async def run() -> None:
        feed: Feed[int | str | None] = Feed(3, quiet_after=60)
        assert feed.take_ready(int) == []  # nothing: no wait either
        for item in (1, 2, None):
            feed.put_nowait(item)
        blocked = asyncio.create_task(feed.put(3))  # full: waits for the consumer
        await wait_for(lambda: feed._putter is not None, 5, "the producer to wait")
        assert feed.take_ready(int) == [1, 2]  # the end marker behind them stays
        await asyncio.wait_for(blocked, 5)
        assert [await feed.get(), await feed.get()] == [None, 3]
        feed.close()

    asyncio.run(run())


def test_tokens_read_together_go_to_the_client_as_one_event(stack: Any, tmp_path: Path) -> None:
    """A stream whose tokens arrive in one read (here the model sends its whole answer in
    one write; under load, tokens that queued while the gateway was busy) is written to
    the client in fewer events, with the same text: fewer writes where it matters."""
    pieces = ["Bees", " dance", " on", " the", " comb", "."]
    with recording_llm("burst-llm", lambda _: pieces) as model:
        env = gateway_env(stack.config, allow_anonymous="true", cache_ttl_s="0",
                          llm_url=model.url)  # fmt: skip
        with running_service("gateway", "ragline_gateway", env, tmp_path) as gateway:
            lines = raw_answer(gateway.url)
    texts = [orjson.loads(lines[i + 1].removeprefix("data: "))["text"]
             for i, line in enumerate(lines) if line == "event: token"]  # fmt: skip
    assert "".join(texts) == "".join(pieces)
    assert 1 <= len(texts) < len(pieces), texts
    assert "event: done" in lines


# --- pings and the idle limit, end to end ---------------------------------------------------


@pytest.fixture(scope="module")
def slow_llm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """llm-svc on the fixed engine: 3 words, 0.8 s apart."""
    env = {"RAGLINE_LLM_ENGINE": "fixed", "RAGLINE_LLM_FIXED_TOKENS": "3",
           "RAGLINE_LLM_TOKEN_INTERVAL_MS": "800"}  # fmt: skip
    with running_service("llm", "ragline_llm", env, tmp_path_factory.mktemp("slow-llm")) as s:
        yield s


def raw_answer(url: str) -> list[str]:
    body = {"message": "How do honeybees tell each other where flowers are?"}
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line]


def test_a_slow_generator_gets_pings_between_tokens(stack: Any, slow_llm: Any,
                                                    tmp_path: Path) -> None:  # fmt: skip
    env = gateway_env(stack.config, allow_anonymous="true", cache_ttl_s="0",
                      keepalive_interval_s="0.2", llm_url=slow_llm.url)  # fmt: skip
    with running_service("gateway", "ragline_gateway", env, tmp_path) as gateway:
        lines = raw_answer(gateway.url)
    tokens = [i for i, line in enumerate(lines) if line == "event: token"]
    assert len(tokens) == 3
    pings = [i for i, line in enumerate(lines) if line == ": ping"]
    assert any(tokens[0] < i < tokens[1] for i in pings)  # while waiting 0.8 s for a token
    assert any(tokens[1] < i < tokens[2] for i in pings)
    assert "event: done" in lines


def test_a_generator_quiet_past_the_idle_limit_ends_the_answer_with_an_error(
    stack: Any, slow_llm: Any, tmp_path: Path
) -> None:
    env = gateway_env(stack.config, allow_anonymous="true", cache_ttl_s="0",
                      keepalive_interval_s="0.1", llm_idle_timeout_s="0.3",
                      llm_url=slow_llm.url)  # fmt: skip
    with running_service("gateway", "ragline_gateway", env, tmp_path) as gateway:
        lines = raw_answer(gateway.url)
    assert lines.count("event: token") == 1  # the first came at once, the second too late
    error = lines[lines.index("event: error") + 1]
    assert orjson.loads(error.removeprefix("data: "))["code"] == "generation_timeout"
    assert "event: done" not in lines
