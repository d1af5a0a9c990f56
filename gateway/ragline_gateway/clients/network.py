"""The gateway's sockets to its upstreams: plain asyncio protocols under httpx, and the
choice of transport for each upstream (`upstream_transport`). Plain-HTTP upstreams use our
own HTTP/1.1 transport (clients/http1.py) unless RAGLINE_GATEWAY_UPSTREAM_HTTP=httpcore;
this module's backend is what the `httpcore` choice runs on.

httpx reaches the network through httpcore's anyio backend, which opens a cancel scope
and a timeout scope around every read. On the relay path that is paid once per token,
for every open answer: the profile in docs/benchmarks.md put a quarter of the gateway's
CPU per relayed token in that read. This backend does the same job with an
`asyncio.Protocol`: a read that finds data returns it at once, and one that must wait
waits on a single future with a loop timer for its timeout.

Only plain-HTTP upstreams use it (the cluster's service-to-service traffic); an `https`
upstream keeps httpx's default transport, TLS included. httpx, httpcore and h11 still do
all the HTTP: this replaces nothing but the socket.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx

from ragline_gateway.clients.http1 import HttptoolsTransport

# Stop reading a socket while this much is received and not yet consumed (a large
# upstream answer read slower than it arrives); resume below half of it.
READ_HIGH_WATER = 256 * 1024


def _expire(waiter: asyncio.Future[None], error: type[Exception], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(error(f"nothing within {timeout} s"))


class _Protocol(asyncio.Protocol):
    """Received chunks in arrival order, and at most one reader waiting for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_HIGH_WATER and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close the transport: HTTP/1.1 has no use for a half-open socket

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def _wake_reader(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= READ_HIGH_WATER // 2:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return chunk


async def _wait(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[None],
    timeout: float | None,
    error: type[Exception],
) -> None:
    """Waits for `waiter`; `error` once `timeout` passes (made only then: this is on the
    path of every token)."""
    if timeout is None:
        await waiter
        return
    timer = loop.call_later(timeout, _expire, waiter, error, timeout)
    try:
        await waiter
    finally:
        timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        # Kept rather than looked up per read: on Python 3.11 each lookup of the running
        # loop is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        if not p.chunks and not p.eof:
            p.reader = self._loop.create_future()
            try:
                await _wait(self._loop, p.reader, timeout, httpcore.ReadTimeout)
            finally:
                p.reader = None
        if p.chunks:
            return p.take(max_bytes)
        if p.error is not None:
            raise httpcore.ReadError(str(p.error)) from p.error
        return b""  # the peer closed: httpcore reports that as a disconnect

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        p = self._protocol
        if p.eof or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        if p.drained is not None:
            await _wait(self._loop, p.drained, timeout, httpcore.WriteTimeout)
            if p.error is not None:
                raise httpcore.WriteError(str(p.error)) from p.error

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS upstreams use httpx's default transport")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # httpcore: has an idle pooled connection been closed?
            return bool(self._protocol.chunks) or self._protocol.eof
        if info == "ssl_object":
            return None
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        return self._transport.get_extra_info(info)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=local
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# How plain-HTTP upstreams are spoken to (RAGLINE_GATEWAY_UPSTREAM_HTTP): `httptools`, our
# own HTTP/1.1 transport (clients/http1.py), or `httpcore`, httpx's own transport on the
# sockets above (the path before it, kept for comparison).
UPSTREAM_HTTP = ("httptools", "httpcore")


def upstream_transport(
    base_url: str, limits: httpx.Limits, http: str = "httptools"
) -> httpx.AsyncBaseTransport:
    """httpx's transport for one upstream. Over plain HTTP, `http` says which
    (UPSTREAM_HTTP); an `https` upstream keeps httpx's default transport either way."""
    if http not in UPSTREAM_HTTP:
        raise ValueError(f"unknown upstream HTTP {http!r}; expected one of {UPSTREAM_HTTP}")
    plain = httpx.URL(base_url).scheme == "http"
    if plain and http == "httptools":
        return HttptoolsTransport(limits)
    transport = httpx.AsyncHTTPTransport(limits=limits)
    if plain:
        # httpx builds the pool and takes no backend argument, so the pool is built again
        # the way httpx builds it, with this backend (tests/test_gateway_relay.py checks
        # that the backend is in use, so an httpx that changes this fails a test).
        transport._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )
    return transport
