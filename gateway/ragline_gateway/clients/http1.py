"""An httpx transport for the gateway's plain-HTTP upstreams: HTTP/1.1 over asyncio
protocols, responses parsed by httptools (llhttp, in C).

Why: with httpx's own transport (httpcore and h11, on the sockets of clients/network.py)
about 28 % of the gateway's CPU per relayed token went to reading llm-svc's stream: h11's
pure-Python parser 11 %, httpcore's and httpx's layers around each chunk (five async
iterators) 17 % (docs/benchmarks.md, "Where the gateway's CPU goes"). Here the bytes a
socket receives are parsed in C inside the protocol's `data_received`, the body's bytes
are queued there, and reading the body is one `__anext__` that returns what is queued:
httpx's `Response` adds only its own two iterators (`aiter_raw` and the client's
`BoundAsyncStream`). A wait for the next token is one future; its read timeout is one loop
timer per connection that is moved only when it fires, not one timer per read.

httpx stays the client API (`httpx.AsyncClient(transport=HttptoolsTransport(limits))`),
so the upstream clients are unchanged. What it does:

- requests: the head and the start of the body in one write; a body of bytes (`json=`,
  `content=b"..."`) or an async iterator, sent as its `Content-Length` says or chunked
  when httpx chose `Transfer-Encoding: chunked`; a write that finds the upstream gone
  stops sending and reads what the upstream answered, as httpcore does;
- responses: `Content-Length`, chunked (extensions and trailers read and dropped) and
  read-until-close bodies; 1xx answers skipped; status, headers and reason phrase as
  httpx's transport gives them; body bytes exactly as received (`aiter_raw`);
- a pool per origin of at most `max_connections` (busy and idle together), the idle
  ones kept alive up to `max_keepalive_connections` for `keepalive_expiry`, taken last
  in first out from an insertion-ordered dict (taking, putting back and dropping one the
  upstream closed are O(1): no walk over the connections per request), and requests that
  find none free wait in turn (FIFO) for one;
- a connection whose response was not read to its end is closed (for llm-svc that stops
  the generation); one the upstream closed while idle is dropped, and a request that
  finds its reused connection closed before writing a byte takes another;
- per-request timeouts as httpx passes them (`request.extensions["timeout"]`: connect,
  read, write, pool), and httpx's exceptions: ConnectTimeout, ConnectError, ReadTimeout,
  ReadError, WriteTimeout, PoolTimeout, RemoteProtocolError, LocalProtocolError.

What it does not do: HTTP/2, TLS (an `https` upstream keeps httpx's default transport:
clients/network.py), proxies, Unix sockets, `Expect: 100-continue`, pipelining, upgrades
(a 101 is a protocol error). A response to HEAD closes its connection (httptools cannot be
told that it has no body). Content decoding is not a transport's job in httpx: `aread`
and `aiter_bytes` decode gzip and deflate as with httpx's own transport (the retriever
and reranker calls send httpx's default `accept-encoding`; our services answer unencoded),
and the LLM request asks for `identity` because its SSE split reads `aiter_raw`.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import Iterator
from typing import cast

import httptools
import httpx

# Stop reading a socket while this much body is received and not yet taken (a large
# answer read slower than it arrives); resume once it is all taken.
READ_HIGH_WATER = 256 * 1024

_IDLE, _ACTIVE, _CLOSED = 0, 1, 2
# What h11 would refuse to send: a header name that is not a token, a value with a line
# break or a NUL in it (a header injected into the request).
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_BAD_VALUE = re.compile(rb"[\0\r\n]")


class _Stale(Exception):
    """A reused connection was found closed before anything was written on it."""


def _expire(waiter: asyncio.Future[object], error: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(error)


class _Connection(asyncio.Protocol):
    """One socket to an upstream, its parser, and the response in progress on it."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _ACTIVE  # a new connection is for the request that opened it
        self.requests = 0
        self.idle_since = 0.0
        self.eof = False  # the upstream closed its side
        self.drained: asyncio.Future[None] | None = None
        # The reader's wait, and its timeout: one timer that is moved only when it fires.
        self.waiter: asyncio.Future[None] | None = None
        self.wait_since = 0.0
        self.wait_timeout: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.chunks: list[bytes] = []  # not a deque: 760 bytes per connection for a token
        self.buffered = 0
        self.paused = False
        self._new_response()

    def _new_response(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.informational = False
        self.head_only = False  # a response to HEAD: complete with its headers
        self.keep_alive = False
        self.sent_all = False  # the whole request went out: the connection may be reused
        self.error: httpx.TransportError | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.state != _ACTIVE:  # idle: an upstream has nothing to say between requests
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._broken(httpx.RemoteProtocolError(f"invalid HTTP from the upstream: {exc!r}"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport: HTTP/1.1 has no use for a half-open socket

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.close()

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # --- httptools' callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.headers_done:  # a second response to one request
            raise httpx.RemoteProtocolError("the upstream sent more than one response")

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # else a trailer: dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # informational: the answer follows it
            self.informational = True
            return
        self.status = status
        self.headers_done = True
        if self.head_only:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.headers, self.reason = [], b""
            return
        self.complete = True
        self.keep_alive = not self.head_only and self.parser.should_keep_alive()
        self._wake()

    # --- state ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _broken(self, error: httpx.TransportError) -> None:
        if not self.complete and self.error is None:
            self.error = error
        self.keep_alive = False
        self._wake()
        self.close()

    def _ended(self, exc: Exception | None) -> None:
        if self.eof:
            return
        self.eof = True
        if self.state == _ACTIVE and not self.complete and self.error is None:
            if self.headers_done and self._until_close():
                self.complete = True  # a body without a length ends with the connection
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            elif self.headers_done:
                self.error = httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            else:
                self.error = httpx.RemoteProtocolError(
                    "Server disconnected without sending a response."
                )
        self.keep_alive = False
        self._wake()
        if self.state == _IDLE:
            self.close()

    def _until_close(self) -> bool:
        if self.status in (204, 304):
            return False
        framing = (b"content-length", b"transfer-encoding")
        return not any(name.lower() in framing for name, _ in self.headers)

    def close(self) -> None:
        """Closes the socket (if not yet) and gives its place in the pool back (once)."""
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()
        self.pool.gone(self)

    def reusable(self, now: float) -> bool:
        transport = self.transport
        return (
            not self.eof
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < self.pool.keepalive_expiry
        )

    def take(self) -> bytes:
        """All the body bytes received and not yet taken."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def done(self) -> None:
        """The response is finished with: its connection goes back to the pool when the
        whole response came and the connection may be kept, else it is closed."""
        if self.chunks:
            self.take()
        if self.complete and self.keep_alive and self.sent_all and self.error is None:
            self.pool.release(self)
        else:
            self.close()

    # --- the reader's side ------------------------------------------------------------------

    async def wait(self, timeout: float | None) -> None:
        """Until the protocol has something for the reader: bytes, the end, or an error;
        httpx.ReadTimeout after `timeout` seconds of nothing."""
        loop = self.loop
        waiter = self.waiter = loop.create_future()
        self.wait_timeout = timeout
        if timeout is not None:
            self.wait_since = now = loop.time()
            deadline = now + timeout
            if self.timer is None or self.timer_at > deadline:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer_at = deadline
                self.timer = loop.call_at(deadline, self._check_timeout)
        try:
            await waiter
        finally:
            self.waiter = None

    def _check_timeout(self) -> None:
        self.timer = None
        waiter, timeout = self.waiter, self.wait_timeout
        if waiter is None or waiter.done() or timeout is None or self.state == _CLOSED:
            return  # no read waiting: the next one sets the timer again
        left = self.wait_since + timeout - self.loop.time()
        if left <= 0:
            waiter.set_exception(httpx.ReadTimeout(f"nothing from the upstream in {timeout} s"))
        else:
            self.timer_at = self.wait_since + timeout
            self.timer = self.loop.call_at(self.timer_at, self._check_timeout)

    async def response_head(self, timeout: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self.wait(timeout)

    # --- the writer's side ------------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        """False when the upstream is gone: what it answered is read next."""
        transport = self.transport
        if self.eof or transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def _drain(self, timeout: float | None) -> None:
        drained = self.drained
        if drained is None:
            return
        timer = None
        if timeout is not None:
            error = httpx.WriteTimeout(f"the upstream took nothing in {timeout} s")
            timer = self.loop.call_later(timeout, _expire, drained, error)
        try:
            await drained
        finally:
            if timer is not None:
                timer.cancel()

    async def send(self, request: httpx.Request, head: bytes, framing: _Framing,
                   timeout: float | None) -> None:  # fmt: skip
        """Writes the request; raises _Stale, before writing anything, when this reused
        connection turns out closed."""
        self.requests += 1
        if self.requests > 1 and (
            self.eof or self.transport is None or self.transport.is_closing()
        ):
            raise _Stale
        self._new_response()
        self.head_only = request.method == "HEAD"
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):  # a body of bytes: read by httpx already
            body = request.content
            framing.check(len(body), final=True)
            if framing.chunked and body:
                body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
            elif framing.chunked:
                body = b"0\r\n\r\n"
            self.sent_all = self._write(head + body)
            await self._drain(timeout)
            return
        pending = head
        sent = 0
        async for chunk in cast(httpx.AsyncByteStream, stream):
            if not chunk:
                continue
            sent += len(chunk)
            framing.check(sent, final=False)
            if framing.chunked:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if pending:
                chunk, pending = pending + chunk, b""
            if not self._write(chunk):
                return  # the upstream is gone: its answer, if any, is read next
            await self._drain(timeout)
        framing.check(sent, final=True)
        if framing.chunked:
            pending += b"0\r\n\r\n"
        self.sent_all = self._write(pending) if pending else not self.eof
        await self._drain(timeout)


class _Framing:
    """How a request's body is delimited: its Content-Length, or chunked."""

    __slots__ = ("chunked", "length")

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.length = length

    def check(self, sent: int, final: bool) -> None:
        length = self.length
        if self.chunked or length is None:
            if not self.chunked and sent and final:
                raise httpx.LocalProtocolError("a request body with neither length nor chunks")
            return
        if sent > length or (final and sent != length):
            raise httpx.LocalProtocolError(
                f"the request body has {sent} bytes, its Content-Length says {length}"
            )


def _head(request: httpx.Request) -> tuple[bytes, _Framing]:
    url = request.url
    target = url.raw_path or b"/"
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), target)]
    chunked = False
    length: int | None = None
    for name, value in request.headers.raw:
        if _BAD_NAME.search(name) or _BAD_VALUE.search(value) or not name:
            raise httpx.LocalProtocolError(f"illegal request header {name!r}")
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.strip().isdigit():
                raise httpx.LocalProtocolError(f"illegal Content-Length {value!r}")
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines), _Framing(chunked, None if chunked else length)


class _Pool:
    """The connections to one origin (module docstring)."""

    def __init__(self, host: str, port: int, limits: httpx.Limits) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.max_connections = limits.max_connections or 2**31
        max_keepalive = limits.max_keepalive_connections
        self.max_idle = self.max_connections if max_keepalive is None else max_keepalive
        expiry = limits.keepalive_expiry
        self.keepalive_expiry = float("inf") if expiry is None else expiry
        self.open = 0  # connections busy, idle or being opened: at most max_connections
        self.idle: dict[_Connection, None] = {}  # in the order put back: the last is taken
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.all: set[_Connection] = set()

    async def acquire(self, timeouts: dict[str, float | None]) -> _Connection:
        idle = self.idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.popitem()[0]
                if conn.reusable(now):
                    conn.state = _ACTIVE
                    return conn
                conn.close()
        if self.open < self.max_connections:
            self.open += 1
        else:
            handed = await self._wait_turn(timeouts.get("pool"))
            if handed is not None:
                return handed
            # Else a place was freed and handed over: `open` already counts it.
        try:
            return await self._connect(timeouts.get("connect"))
        except BaseException:
            self._free_place()
            raise

    async def _wait_turn(self, timeout: float | None) -> _Connection | None:
        """A kept-alive connection put back, or None: a place to open one."""
        turn: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(turn)
        timer = None
        if timeout is not None:
            error = httpx.PoolTimeout(f"no connection free in {timeout} s")
            timer = self.loop.call_later(timeout, _expire, turn, error)
        try:
            return await turn
        except BaseException:
            # Given a turn and cancelled before taking it: pass it on.
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                handed = turn.result()
                if handed is None:
                    self._free_place()
                else:
                    self.release(handed)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(self, timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                transport, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection in {timeout} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.all.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose response was read to its end, to be kept alive."""
        if conn.state == _CLOSED or conn.eof:
            conn.close()
            return
        waiters = self.waiters
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                conn.state = _ACTIVE
                turn.set_result(conn)
                return
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.state = _IDLE
        conn.idle_since = self.loop.time()
        self.idle[conn] = None

    def gone(self, conn: _Connection) -> None:
        """`conn` closed: its place is free. (A connection that `_connect` did not return
        holds no place: `acquire` frees it.)"""
        if conn in self.all:
            self.all.discard(conn)
            self.idle.pop(conn, None)
            self._free_place()

    def _free_place(self) -> None:
        waiters = self.waiters
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the place goes to it: `open` stays
                return
        self.open -= 1

    def close(self) -> None:
        for conn in list(self.all):
            conn.close()


class _Body(httpx.AsyncByteStream):
    """A response's body, read from its connection; closing it finishes the response."""

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self._conn = conn
        self._timeout = timeout
        self._closed = False

    def __aiter__(self) -> _Body:  # type: ignore[override]
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            if self._closed:  # the connection may serve another request by now
                raise StopAsyncIteration
            if conn.chunks:
                return conn.take()
            if conn.complete:
                await self.aclose()
                raise StopAsyncIteration
            if conn.error is not None:
                error = conn.error
                await self.aclose()
                raise error
            await conn.wait(self._timeout)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.done()


class HttptoolsTransport(httpx.AsyncBaseTransport):
    """httpx's transport for plain-HTTP upstreams (module docstring)."""

    def __init__(self, limits: httpx.Limits = httpx.Limits()) -> None:
        self._limits = limits
        self._pools: dict[tuple[str, int], _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"this transport speaks plain HTTP, not {url.scheme}")
        key = (url.host, url.port or 80)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(key[0], key[1], self._limits)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        head, framing = _head(request)
        while True:
            conn = await pool.acquire(timeouts)
            try:
                await conn.send(request, head, framing, timeouts.get("write"))
                await conn.response_head(timeouts.get("read"))
            except _Stale:
                conn.close()
                continue  # nothing was sent on it: another connection takes the request
            except BaseException:
                conn.close()
                raise
            break
        version = conn.parser.get_http_version()
        return httpx.Response(
            status_code=conn.status,
            headers=conn.headers,
            stream=_Body(conn, timeouts.get("read")),
            extensions={
                "http_version": b"HTTP/" + version.encode("ascii"),
                "reason_phrase": conn.reason.strip(),
            },
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def connections(self) -> Iterator[tuple[str, int, int, int]]:
        """(host, port, open, idle) per origin: for tests and debugging."""
        for (host, port), pool in self._pools.items():
            yield host, port, pool.open, len(pool.idle)
