"""Connections to a cluster's API server: the pool and the response-side protocol.

The response parser only finds where each message ends; body bytes go from this transport
to the exchange's `sink` (the client transport, for a proxied request) exactly as they arrived,
chunked framing included. What the pool and the connection need of a request is the
`UpstreamExchange` contract below: proxy.ProxyExchange for proxied requests,
upstream_client.InternalExchange for the gateway's own.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from .flow import WRITE_HIGH_WATER, WRITE_LOW_WATER
from .headers import has_framing
from .tlssocket import open_tls_connection

if TYPE_CHECKING:
    from .config import ClusterConfig

log = logging.getLogger("fastproxy.upstream")

MAX_RESPONSE_HEAD = 256 * 1024
_LINE_ENDS = (b"\r", b"\n")
_HEAD_END = b"\r\n\r\n"


class UpstreamError(Exception):
    """The upstream broke HTTP; the exchange cannot be completed."""


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


class UpstreamExchange(Protocol):
    """One request as the pool and its upstream connection see it."""

    method: bytes        # the request method (a HEAD answer has no body)
    upgrade: bool        # the request asks to switch protocols
    sink: Sink           # where response body bytes go, as received
    finished: bool       # the exchange no longer wants a connection
    request_done: bool   # the whole request was sent
    bytes_out: int       # response bytes relayed to the sink; the connection adds body bytes

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        """A connection is attached: send the request on it."""

    def upstream_unreachable(self, message: str) -> None:
        """No connection could be opened (the message names the cluster and why)."""

    def peer_full(self, full: bool) -> None:
        """The connection's write buffer crossed a water mark."""

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        """The final response head arrived (`conn.head`), with the body bytes read along with it."""

    def upstream_switched(self, conn: UpstreamConnection, early: memoryview) -> None:
        """A 101: from now on bytes flow both ways untouched."""

    def upstream_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        """The response ended; the exchange gives the connection back to its pool."""

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The connection closed."""

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        """The cluster broke HTTP."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "transport", "parser", "exchange", "reused", "idle_since", "got_bytes",
        "head_buffer", "heads_skipped", "status", "head", "keep_alive", "framed",
        "head_done", "complete", "tunnel", "closed", "reading_paused",
    )

    transport: asyncio.Transport  # set by connection_made, before anything else is called

    def __init__(self, pool: Pool):
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: UpstreamExchange | None = None
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.reading_paused = False
        self._reset()

    def _reset(self) -> None:
        self.got_bytes = False
        self.head_buffer = b""
        self.heads_skipped = 0
        self.status = 0
        self.head = b""  # the final response head as received, CRLF CRLF included
        self.keep_alive = False
        self.framed = False
        self.head_done = False
        self.complete = False
        self.tunnel = False

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        del self.parser  # it holds this connection's callbacks: a cycle left to the cycle collector
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self)

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the exchange

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.peer_full(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.peer_full(False)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes on an idle connection: it can no longer be trusted
            return
        if self.tunnel:
            exchange.sink.write(data)
            exchange.bytes_out += len(data)
            return
        self.got_bytes = True
        if self.head_done:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                exchange.upstream_broken(self, _parse_failure(exc, "invalid response body"))
                return
            exchange.sink.write(data)
            exchange.bytes_out += len(data)
        else:
            self._head_data(exchange, data)
        if self.complete and self.exchange is exchange:  # the response ended
            reusable = self.keep_alive and exchange.request_done and not exchange.upgrade
            self.exchange = None
            self._reset()
            exchange.upstream_complete(self, reusable)

    def _head_data(self, exchange: UpstreamExchange, data: bytes) -> None:
        buffer = self.head_buffer + data if self.head_buffer else data
        upgraded_at = -1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            upgraded_at = len(buffer) - len(data) + exc.args[0]
        except httptools.HttpParserError as exc:
            exchange.upstream_broken(self, _parse_failure(exc, "invalid response"))
            return
        if not self.head_done:
            if len(buffer) > MAX_RESPONSE_HEAD:
                exchange.upstream_broken(self, "response head too large")
            else:
                self.head_buffer = bytes(buffer)
            return
        self.head_buffer = b""
        if self.heads_skipped or buffer.startswith(_LINE_ENDS):
            start, end = _final_head_bounds(buffer, self.heads_skipped)
        else:  # nearly every response: the buffer begins with the final head
            start, end = 0, buffer.find(_HEAD_END)
        if end < 0:
            exchange.upstream_broken(self, "response head not terminated by CRLF CRLF")
            return
        body_start = end + len(_HEAD_END)
        self.head = buffer[start:body_start]
        # The parser keeps a connection alive only when the body is delimited; otherwise look.
        self.framed = self.keep_alive or self.status in (204, 304) or has_framing(self.head)
        if upgraded_at >= 0:
            if self.status != 101 or not exchange.upgrade:
                exchange.upstream_broken(self, "unexpected protocol switch")
                return
            self.tunnel = True
            self.complete = False  # the 101 ends HTTP on this connection, not the exchange
            exchange.upstream_switched(self, memoryview(buffer)[upgraded_at:])
            return
        body = None
        if body_start < len(buffer):
            if exchange.method == b"HEAD":
                self.keep_alive = False  # a body after a HEAD answer: out of step, never reuse
            else:
                body = memoryview(buffer)[body_start:]
        exchange.upstream_head(self, body)

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response, unasked for: a desynchronised upstream.
            raise UpstreamError("data after the end of the response")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise UpstreamError(f"status code {status:03d} is not an HTTP status")  # the parser takes any 3 digits
        if 100 <= status < 200 and status != 101:
            self.heads_skipped += 1  # e.g. 100 Continue: the gateway answers those itself
            return
        self.status = status
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.exchange is not None and self.exchange.method == b"HEAD":
            self.complete = True  # no body follows, whatever the headers announce
            self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # --- used by the exchange and the pool ---------------------------------------------------

    def send(self, *parts: bytes) -> None:
        self.transport.writelines(parts)

    def pause_reading(self) -> None:
        """The client cannot take more: stop reading the response until it can."""
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()


def _final_head_bounds(buffer: bytes, heads_skipped: int) -> tuple[int, int]:
    """Where the final response head starts and where its CRLF CRLF is (-1: not found): after
    the informational (1xx) heads the parser skipped, and the empty lines it skips before a head."""
    start, end = 0, -len(_HEAD_END)
    for _ in range(heads_skipped + 1):
        start = end + len(_HEAD_END)
        while buffer[start:start + 1] in _LINE_ENDS:
            start += 1
        end = buffer.find(_HEAD_END, start)
        if end < 0:
            break
    return start, end


def _parse_failure(exc: httptools.HttpParserError, what: str) -> str:
    """Why the parser stopped: our own callback's UpstreamError says it best."""
    cause = exc.__context__
    return str(cause) if isinstance(cause, UpstreamError) else f"{what}: {exc}"


class ResumingContext(ssl.SSLContext):
    """A client TLS context that remembers the latest session it learnt, for new connections to offer.

    Each watch holds its own upstream connection, so clients opening many watches cost the
    gateway a TLS handshake each; resuming a session skips the certificate exchange and its
    verification. The session comes from a connection that verified this same cluster.

    A session is learnt only from a full handshake: one that resumed still has the session it
    offered, which the cluster has just accepted again. That also keeps reads of
    `SSLSocket.session` rare: in CPython 3.11 (gh-116810) each read leaks a copy of the session,
    certificate chain included (6.5 KiB here), and one per dial grew the worker without end.
    """

    latest_session: ssl.SSLSession | None = None

    def learn_session(self, transport: asyncio.Transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or (ssl_object.session_reused and self.latest_session is not None):
            return
        session = ssl_object.session
        if session is not None:
            self.latest_session = session


class PoolStats:
    """What a cluster's pools did, counted per dial (never per request); kept by the cluster
    registry across a pool's replacements, so the totals only grow."""

    __slots__ = ("dials", "dial_failures", "tls_resumptions")

    def __init__(self) -> None:
        self.dials = 0            # connections attempted
        self.dial_failures = 0    # attempts that did not end in a connection (refused, TLS, timeout)
        self.tls_resumptions = 0  # TLS handshakes that resumed a session instead of a full exchange


class Pool:
    """Keep-alive HTTP/1.1 connections to one cluster, shared by every request of this worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cluster: ClusterConfig, ssl_context: ResumingContext | None,
                 stats: PoolStats | None = None):
        self.loop = loop
        self.cluster = cluster
        self.ssl_context = ssl_context
        self.stats = PoolStats() if stats is None else stats
        self.server_hostname = cluster.tls_server_name or cluster.host  # what TLS verifies
        self.idle: list[UpstreamConnection] = []
        self.open_count = 0
        self.retired = False  # replaced in the registry: serves what it holds, pools nothing
        self.waiting: deque[UpstreamExchange] = deque()

    def acquire(self, exchange: UpstreamExchange, *, fresh: bool = False) -> None:
        """Attach a connection to `exchange` now or later (`exchange.upstream_ready`)."""
        if not fresh:
            now = self.loop.time()
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed and now - conn.idle_since < self.cluster.idle_connection_timeout:
                    conn.reused = True
                    exchange.upstream_ready(conn)
                    return
                conn.close()
        if self.open_count < self.cluster.max_connections:
            self.open_count += 1
            self.loop.create_task(self._connect(exchange))
        else:
            self.waiting.append(exchange)

    def cancel(self, exchange: UpstreamExchange) -> None:
        try:
            self.waiting.remove(exchange)
        except ValueError:
            pass

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose response is complete."""
        if conn.closed:
            return
        if self.retired and not self.waiting:
            conn.close()
            return
        if not conn.reused and self.ssl_context is not None:
            # A TLS 1.3 session ticket arrives after the handshake: by now it has.
            self.ssl_context.learn_session(conn.transport)
        if conn.reading_paused:
            conn.resume_reading()
        while self.waiting:
            exchange = self.waiting.popleft()
            if not exchange.finished:
                conn.reused = True
                exchange.upstream_ready(conn)
                return
        if len(self.idle) < self.cluster.max_idle_connections:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
        else:
            conn.close()

    def give_back(self, conn: UpstreamConnection, reusable: bool) -> None:
        """The exchange is done with `conn`: pool it if its last response left it reusable."""
        if reusable:
            self.release(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it and let a waiting exchange open a new one."""
        self.open_count -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        while self.waiting and self.open_count < self.cluster.max_connections:
            exchange = self.waiting.popleft()
            if not exchange.finished:
                self.open_count += 1
                self.loop.create_task(self._connect(exchange))

    def expire_idle(self) -> None:
        deadline = self.loop.time() - self.cluster.idle_connection_timeout
        for conn in [c for c in self.idle if c.idle_since < deadline]:
            conn.close()

    def retire(self) -> None:
        """Replaced: close the idle connections and pool none again; the busy ones finish."""
        self.retired = True
        self.close()

    def close(self) -> None:
        for conn in list(self.idle):
            conn.close()

    async def _connect(self, exchange: UpstreamExchange) -> None:
        cluster = self.cluster
        self.stats.dials += 1
        try:
            conn = await asyncio.wait_for(self._open(), cluster.connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self.open_count -= 1
            self.stats.dial_failures += 1
            reason = "timed out connecting" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            log.warning("cluster %s: %s", cluster.name, reason)
            exchange.upstream_unreachable(f'cluster "{cluster.name}" is unreachable: {reason}')
            return
        if exchange.finished:
            self.release(conn)
        else:
            exchange.upstream_ready(conn)

    async def _open(self) -> UpstreamConnection:
        cluster, context = self.cluster, self.ssl_context
        conn = UpstreamConnection(self)
        if context is None:
            await self.loop.create_connection(lambda: conn, cluster.host, cluster.port)
        else:
            transport = await open_tls_connection(self.loop, lambda: conn, cluster.host, cluster.port,
                                                  context, self.server_hostname, context.latest_session)
            if transport.get_extra_info("ssl_object").session_reused:
                self.stats.tls_resumptions += 1
        return conn
