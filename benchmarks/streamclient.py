"""A small, cheap HTTP/1.1 + SSE load client on raw asyncio streams, for the gateway benchmarks.

httpx costs a few hundred microseconds of Python per request and per chunk; with a
thousand streams on two cores shared with the services under test, the client would
measure itself. This one does only what the benchmarks need: keep-alive connections in
a pool per host (like the gateway's own upstream pools), `Content-Length` or chunked
bodies, and timestamps taken when each chunk of the body arrives, so time to first token
is time to the first *token* in the body, not to the response headers.

Three ways to get an answer to a question, each timed from just before the first byte
is sent:

- `ask_native`: `POST /api/chat` on nginx or the gateway; the first `event: token` frame
  is the first token;
- `ask_direct`: what the gateway does, done by the client itself against the upstream
  services: `POST /v1/retrieve` (retriever-svc), `POST /v1/rerank` (reranker-svc), the
  same prompt (the gateway's own `build_messages`), then llm-svc's streamed
  `/v1/chat/completions`; the first chunk with non-empty `delta.content` is the first
  token;
- `stream_llm`: only the last step, with a prompt built once (the control for the
  open-streams benchmark).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ragline_common.passages import Passage
from ragline_gateway.prompt import build_messages

READ_LIMIT = 1 << 22  # a retrieve response with 50 passages is ~50 KB


class HttpError(Exception):
    pass


class Connection:
    __slots__ = ("reader", "reusable", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def stale(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.reusable = False
        self.writer.close()


class Pool:
    """Idle keep-alive connections to one host:port, opened on demand, unbounded."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[Connection] = []
        self.opened = 0

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection, and whether it was reused (a reused one may have been closed by
        the server's keep-alive timeout just now: the caller retries once on a new one)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.stale():
                return conn, True
            conn.close()
        self.opened += 1
        return await Connection.open(self.host, self.port), False

    def release(self, conn: Connection) -> None:
        if conn.reusable and not conn.stale():
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Response:
    def __init__(self, conn: Connection, status: int, headers: dict[bytes, bytes]) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (one HTTP chunk at a time when chunked)."""
        reader = self.conn.reader
        if self.headers.get(b"connection", b"").lower() == b"close":
            self.conn.reusable = False
        if self.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are sent here
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif b"content-length" in self.headers:
            n = int(self.headers[b"content-length"])
            if n:
                yield await reader.readexactly(n)
        else:
            self.conn.reusable = False
            while data := await reader.read(65536):
                yield data

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])


async def request(
    pool: Pool, method: str, path: str, body: bytes | None = None
) -> tuple[Response, float]:
    """Sends one request (retrying once on a reused connection the server had closed);
    returns the response once its head is read, and when the request was sent."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {pool.host}:{pool.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body or b'')}\r\n\r\n"
    ).encode()
    for attempt in (0, 1):
        conn, reused = await pool.acquire()
        sent = time.perf_counter()
        try:
            conn.writer.write(head + (body or b""))
            status_line = await conn.reader.readuntil(b"\r\n")
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            conn.close()
            if reused and attempt == 0:
                continue
            raise HttpError(f"{pool.host}:{pool.port}: {exc!r}") from exc
        except BaseException:
            conn.close()
            raise
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except BaseException:
            conn.close()
            raise
        headers: dict[bytes, bytes] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return Response(conn, int(status_line.split(b" ", 2)[1]), headers), sent
    raise AssertionError("unreachable")


async def call_json(pool: Pool, method: str, path: str, payload: Any = None) -> Any:
    body = None if payload is None else orjson.dumps(payload)
    response, _ = await request(pool, method, path, body)
    try:
        data = await response.read()
    except BaseException:
        response.conn.close()
        raise
    pool.release(response.conn)
    if response.status >= 400:
        raise HttpError(f"{method} {path}: {response.status} {data[:200]!r}")
    return orjson.loads(data) if data else None


@dataclass
class Result:
    """One answer as the client saw it; times are perf_counter seconds."""

    sent: float = 0.0
    first_token: float | None = None
    end: float = 0.0
    tokens: int = 0
    error: str | None = None
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # the gateway's, from `done`
    cached: bool = False  # `done` said the answer came from the cache
    token_times: list[float] | None = None  # arrival of every token, when asked for

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.sent) * 1000


class _Frames:
    """Splits an SSE body into frames (`\\n\\n`-terminated) across chunk boundaries."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        if b"\n\n" not in self.buffer:
            return []
        *frames, self.buffer = self.buffer.split(b"\n\n")
        return frames


def _note_token(result: Result, now: float) -> None:
    if result.first_token is None:
        result.first_token = now
    result.tokens += 1
    if result.token_times is not None:
        result.token_times.append(now)


async def _read_native(response: Response, result: Result) -> None:
    frames = _Frames()
    async for chunk in response.chunks():
        now = time.perf_counter()
        for frame in frames.feed(chunk):
            if frame.startswith(b"event: token"):
                _note_token(result, now)
            elif frame.startswith(b"event: done"):
                done = orjson.loads(frame.split(b"data: ", 1)[1])
                result.degraded = done.get("degraded") or []
                result.timings = done.get("timings") or {}
                result.cached = bool(done.get("cached"))
            elif frame.startswith(b"event: error"):
                result.error = frame.split(b"data: ", 1)[-1].decode()[:200]


async def _read_openai(response: Response, result: Result) -> None:
    frames = _Frames()
    async for chunk in response.chunks():
        now = time.perf_counter()
        for frame in frames.feed(chunk):
            if b'"content":"' in frame and b'"content":""' not in frame:
                _note_token(result, now)
            elif b'"error"' in frame:
                result.error = frame.decode()[:200]


async def _stream(pool: Pool, path: str, body: bytes, result: Result, native: bool) -> None:
    response, result.sent = await request(pool, "POST", path, body)
    try:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
        elif native:
            await _read_native(response, result)
        else:
            await _read_openai(response, result)
    except BaseException:
        response.conn.close()
        raise
    pool.release(response.conn)


async def ask_native(
    pool: Pool, question: str, collection: str, result: Result | None = None
) -> Result:
    """`POST /api/chat` through nginx or straight to the gateway. Pass a `Result` to watch
    the answer while it streams (give it `token_times` to record every token)."""
    result = result or Result()
    body = orjson.dumps({"message": question, "collection": collection})
    try:
        await _stream(pool, "/api/chat", body, result, native=True)
    except (HttpError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        result.error = repr(exc)[:200]
    result.end = time.perf_counter()
    return result


@dataclass
class Upstreams:
    """The three services the gateway waits on, and what the gateway would send them."""

    retriever: Pool
    reranker: Pool
    llm: Pool
    model: str
    candidates: int = 50
    top_n: int = 5
    max_tokens: int = 512
    temperature: float = 0.2

    def close(self) -> None:
        for pool in (self.retriever, self.reranker, self.llm):
            pool.close()

    def llm_body(self, messages: list[dict[str, str]]) -> bytes:
        return orjson.dumps(
            {
                "model": self.model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        )


async def ask_direct(up: Upstreams, question: str, collection: str) -> Result:
    """The gateway's stages done by the client: retrieve, rerank, prompt, stream."""
    result = Result()
    try:
        result.sent = start = time.perf_counter()
        found = await call_json(
            up.retriever, "POST", "/v1/retrieve",
            {"query": question, "collection": collection, "top_k": up.candidates, "filters": {}},
        )  # fmt: skip
        hits = found["hits"]
        result.degraded = list(found.get("degraded") or [])
        if hits:
            ranked = await call_json(
                up.reranker, "POST", "/v1/rerank",
                {"query": question, "documents": [h["text"] for h in hits],
                 "top_n": min(up.top_n, len(hits))},
            )  # fmt: skip
            top = [hits[r["index"]] for r in ranked["results"]]
        else:
            top = []
        passages = [Passage(n, h.get("title") or "", h["text"]) for n, h in enumerate(top, 1)]
        body = up.llm_body(build_messages(question, passages, []))
        await _stream(up.llm, "/v1/chat/completions", body, result, native=False)
        result.sent = start  # the whole answer is timed, not the last request
    except (HttpError, ConnectionError, asyncio.IncompleteReadError, OSError, KeyError) as exc:
        result.error = repr(exc)[:200]
    result.end = time.perf_counter()
    return result


async def stream_llm(up: Upstreams, body: bytes, result: Result | None = None) -> Result:
    """llm-svc's stream alone, for a prompt built beforehand."""
    result = result or Result()
    try:
        await _stream(up.llm, "/v1/chat/completions", body, result, native=False)
    except (HttpError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        result.error = repr(exc)[:200]
    result.end = time.perf_counter()
    return result
