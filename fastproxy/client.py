"""The client side: one protocol per connection, one responder per request.

ClientConnection parses requests with httptools, asks the gateway's router for each request's
responder (exchange.Responder: the cluster proxy, an in-process handler, or a refusal) and keeps
responses in request order (keep-alive, pipelining), with head and body limits and deadlines.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Protocol

import httptools

from .config import Config
from .context import Observers, RequestContext, RequestHead
from .exchange import AWAITING_HEAD, AWAITING_RESPONSE, IDLE, Responder
from .flow import PIPELINED, WRITE_HIGH_WATER, WRITE_LOW_WATER, ReadGate
from .status import StatusError, status_response

log = logging.getLogger("fastproxy.client")

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}  # the parser's version strings as the heads carry them


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a request head's target and fields as parsed (what the parser holds of a field
    not finished yet is not counted)."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


class Router(Protocol):
    """What a connection needs of the gateway: a responder for each request head."""

    config: Config
    loop: asyncio.AbstractEventLoop
    observers: Observers
    connections: set[ClientConnection]

    def responder(self, client: ClientConnection, head: RequestHead, keep_alive: bool) -> Responder: ...


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "gateway", "transport", "gate", "parser", "client_ip", "url", "headers", "head_size",
        "parsing_head", "began_in_feed", "receiving", "active", "queue", "upgraded", "broken",
        "deadline", "deadline_kind", "write_paused", "tls", "limits", "big_read",
    )

    def __init__(self, gateway: Router):
        self.gateway = gateway
        self.limits = gateway.config.server  # read on every header and body piece
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.parsing_head = False
        self.began_in_feed = False
        self.big_read = False
        self.receiving: Responder | None = None  # the exchange whose request is being parsed
        self.active: Responder | None = None     # the exchange whose response is being written
        self.queue: list[Responder] = []  # pipelined requests; a list is 600 bytes smaller than a deque
        self.upgraded = False
        self.broken = False
        self.deadline = 0.0
        self.deadline_kind = 0
        self.write_paused = False
        self.tls = False

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.gate = ReadGate(transport)
        self.tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if isinstance(peer, tuple) else b"unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Find clients that vanished without a FIN, so their watches release upstream connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        self.gateway.connections.add(self)
        self.set_deadline(AWAITING_HEAD, self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.connections.discard(self)
        self.deadline = 0.0
        # The parser holds this connection's callbacks: a cycle that would leave the connection
        # and its transport to the cycle collector. Nothing is parsed from here on.
        del self.parser
        for exchange in (self.active, self.receiving, *self.queue):
            if exchange is not None:
                exchange.abandon()
        self.active = self.receiving = None
        self.queue.clear()

    def eof_received(self) -> bool:
        """The client finished sending (a half-close): answer what it asked, then close.

        TLS has no half-close, so there the connection simply ends."""
        self.broken = True
        answering = self.active is not None and not self.active.tunnel and not self.tls
        if answering:
            for exchange in (self.active, *self.queue):
                exchange.keep_alive = False
        return answering

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.writing_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.active is not None:
            self.active.writing_resumed()

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            if self.receiving is not None:
                self.receiving.tunnel_data(data)
            return
        if self.broken:
            return
        self.began_in_feed = False
        # A head parsed within one read no larger than the limit is within the limit: only the
        # others are measured. A read's header fields are held unmeasured at most once.
        self.big_read = len(data) > self.limits.max_header_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            rest = data[exc.args[0]:]
            if rest and self.receiving is not None:
                self.receiving.tunnel_data(rest)
            return
        except httptools.HttpParserError as exc:
            if self.broken:
                return  # the connection is closing: what follows the last answered request is not read
            cause = exc.__context__
            if isinstance(cause, StatusError):
                self._refuse_stream(cause.code, cause.message)
            else:
                self._refuse_stream(400, f"malformed HTTP request: {exc}")
            return
        if self.parsing_head:
            if not self.began_in_feed:
                self.head_size += len(data)  # bytes the parser holds for a head not finished yet
            else:
                self.head_size = _head_size(self.url, self.headers)
                if self.active is None:
                    # Set only for a head left unfinished: one parsed within a single read never waits.
                    self.set_deadline(AWAITING_HEAD, self.limits.header_timeout)
            if self.head_size > self.limits.max_header_bytes:
                self._refuse_stream(431, "request header fields too large")

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.broken:
            # A response already said Connection: close; a request pipelined after it is not
            # served (the client resends it on a new connection).
            raise ConnectionAbortedError("the connection is closing")
        self.parsing_head = True
        self.began_in_feed = True
        self.url = b""  # self.headers is a fresh list since the last head (or the connection) began

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.parsing_head:
            # A chunked body's trailer fields: dropped, never forwarded and never taken for the
            # next request's headers (that would let one request smuggle headers into another).
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.parsing_head = False
        if (self.big_read or not self.began_in_feed) and (
                _head_size(self.url, self.headers) > self.limits.max_header_bytes):
            raise StatusError(431, "request header fields too large")
        if self.active is None:
            self.deadline = 0.0  # an idle or head deadline: while an exchange is active, the deadline is its own
        parser = self.parser
        version = parser.get_http_version()
        head = RequestHead(parser.get_method(), self.url, _VERSIONS.get(version) or version.encode(),
                           self.headers, self.client_ip, parser.should_upgrade())
        self.headers = []  # the next head's; nothing else is appended (trailers are dropped)
        # After an upgrade request the parser takes no further requests on this connection.
        keep_alive = parser.should_keep_alive() and not head.upgrade
        exchange = self.gateway.responder(self, head, keep_alive)
        self.receiving = exchange
        self._enqueue(exchange)

    def on_body(self, body: bytes) -> None:
        self.receiving.request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.receiving
        exchange.request_complete()
        if not exchange.upgrade:
            self.receiving = None

    # --- exchanges ---------------------------------------------------------------------------

    def _enqueue(self, exchange: Responder) -> None:
        if self.active is None and not self.queue:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.gate.close(PIPELINED)

    def exchange_finished(self, exchange: Responder) -> None:
        if exchange is not self.active:
            return
        self.active = None
        if not exchange.keep_alive:
            self.broken = True
            self.transport.close()
            return
        if self.queue:
            nxt = self.queue.pop(0)
            if not self.queue:
                self.gate.open(PIPELINED)
            self.active = nxt
            nxt.start()
        elif self.parsing_head:
            self.set_deadline(AWAITING_HEAD, self.limits.header_timeout)
        else:  # set_deadline, inlined: every keep-alive response ends here
            self.deadline_kind = IDLE
            self.deadline = self.gateway.loop.time() + self.limits.idle_timeout

    def _refuse_stream(self, code: int, message: str) -> None:
        """The byte stream itself is bad: answer after the responses already owed, then close."""
        self.broken = True
        self.gate.close(PIPELINED)
        unfinished = self.receiving
        if unfinished is not None and not unfinished.request_done and not unfinished.finished:
            unfinished.fail(code, message, close=True)  # its body can never be completed
        else:
            observers = self.gateway.observers
            refusal = Responder(self, RequestContext(RequestHead(b"", b"", b"", [], self.client_ip), time.monotonic()),
                                observers, False)
            refusal.canned = status_response(code, message, close=True)
            refusal.ctx.message = message
            if observers.active:
                observers.start(refusal.ctx)
            self._enqueue(refusal)

    # --- deadlines, checked by the worker's once-a-second sweep ------------------------------

    def set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.gateway.loop.time() + seconds

    def clear_deadline(self, kind: int) -> None:
        if self.deadline_kind == kind:
            self.deadline = 0.0

    def deadline_passed(self) -> None:
        kind, self.deadline = self.deadline_kind, 0.0
        if kind == AWAITING_RESPONSE and self.active is not None:
            self.active.timed_out()
        elif kind == AWAITING_HEAD and self.active is None and self.parsing_head:
            self._refuse_stream(408, "timed out reading the request head")
        else:
            self.transport.close()
