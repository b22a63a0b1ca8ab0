"""The client side: one protocol per connection, one exchange per request.

ClientConnection parses requests with httptools and keeps responses in request order
(keep-alive, pipelining); Exchange carries one request to its upstream connection and the
response back, streaming both bodies with backpressure, or turns into a byte tunnel after a 101.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

import httptools

from . import headers as hdrs
from .flow import AWAITING_PEER, PEER_FULL, PENDING_LIMIT, PIPELINED, ReadGate, WRITE_HIGH_WATER, WRITE_LOW_WATER
from .gateway import Plan, RequestHead
from .routing import HEALTH
from .status import StatusError, status_response

if TYPE_CHECKING:
    from .gateway import Gateway
    from .upstream import UpstreamConnection

log = logging.getLogger("fastproxy.client")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
RETAIN_LIMIT = 1024 * 1024  # request bytes kept for one retry on a stale pooled connection

# What the connection's deadline guards.
AWAITING_HEAD, IDLE, AWAITING_RESPONSE = 1, 2, 3


class Exchange:
    """One request and its response."""

    __slots__ = (
        "client", "sink", "plan", "keep_alive", "canned", "upstream", "pending", "pending_size", "sent",
        "sent_size", "retried", "request_done", "response_started", "finished", "tunnel", "body_size",
    )

    def __init__(self, client: ClientConnection, plan: Plan | None, keep_alive: bool, canned: bytes = b""):
        self.client = client
        self.sink = client.transport      # where the upstream connection writes response bytes
        self.plan = plan
        self.keep_alive = keep_alive
        self.canned = canned              # a response the gateway gives itself (plan is None)
        self.upstream: UpstreamConnection | None = None
        self.pending: list[bytes] = []    # request bytes waiting for the upstream connection
        self.pending_size = 0
        self.sent: list[bytes] | None = []  # request bytes kept until the first response byte
        self.sent_size = 0
        self.retried = False
        self.request_done = False
        self.response_started = False
        self.finished = False
        self.tunnel = False
        self.body_size = 0

    # --- driven by the client connection -----------------------------------------------------

    def start(self) -> None:
        client = self.client
        plan = self.plan
        if plan is None:
            client.transport.write(self.canned)
            self.finish()
            return
        if not plan.long_running and not plan.upgrade:
            client.set_deadline(AWAITING_RESPONSE, plan.upstream.cluster.response_header_timeout)
        if plan.nested is not None:
            # The connection holds this exchange (and those behind it) until the cluster answers.
            client.gateway.review_impersonation(plan, self.impersonation_reviewed)
            return
        if plan.expect_continue:
            client.transport.write(CONTINUE)
        plan.upstream.pool.acquire(self)

    def impersonation_reviewed(self, refusal: StatusError | None) -> None:
        if self.finished:
            return  # timed out or the client left meanwhile
        if refusal is not None:
            # A client still holding back its body (Expect) cannot go on with this connection.
            self.fail(refusal.code, refusal.message, close=self.plan.expect_continue and not self.request_done)
            return
        if self.plan.expect_continue:
            self.client.transport.write(CONTINUE)
        self.plan.upstream.pool.acquire(self)

    def request_body(self, data: bytes) -> None:
        if self.finished or self.plan is None:
            return  # a body nobody will read: parsed and dropped
        self.body_size += len(data)
        limit = self.client.limits.max_body_bytes
        if limit and self.body_size > limit:
            self.fail(413, f"request body larger than {limit} bytes", close=True)
            return
        if self.plan.chunked:
            # Re-framed by the gateway, so the upstream reads exactly the message the gateway parsed.
            self._forward(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._forward(data)

    def request_complete(self) -> None:
        self.request_done = True
        if self.plan is not None and self.plan.chunked and not self.finished:
            self._forward(b"0\r\n\r\n")

    def tunnel_data(self, data: bytes) -> None:
        """Client bytes after an upgrade request: held until the upstream agrees to switch."""
        if self.finished or self.plan is None:
            return
        if self.tunnel:
            self.upstream.transport.write(data)
        else:
            self._hold(data)

    def _forward(self, *parts: bytes) -> None:
        if self.upstream is None:
            self._hold(*parts)
        else:
            self.upstream.send(*parts)
        if self.sent is not None:
            self.sent_size += sum(map(len, parts))
            if self.sent_size > RETAIN_LIMIT:
                self.sent = None
            else:
                self.sent += parts

    def _hold(self, *parts: bytes) -> None:
        self.pending += parts
        self.pending_size += sum(map(len, parts))
        if self.pending_size > PENDING_LIMIT:
            self.client.gate.close(AWAITING_PEER)

    # --- driven by the pool and the upstream connection --------------------------------------

    def peer_full(self, full: bool) -> None:
        """The upstream's write buffer crossed a water mark: stop or resume reading the client."""
        if full:
            self.client.gate.close(PEER_FULL)
        else:
            self.client.gate.open(PEER_FULL)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.exchange = self
        if self.client.write_paused:
            conn.pause_reading()
        if self.plan.upgrade:
            conn.send(self.plan.head)  # early tunnel bytes wait for the 101
        else:
            conn.send(self.plan.head, *self.pending)
            self.pending, self.pending_size = [], 0
            self.client.gate.open(AWAITING_PEER)
        if self.sent is not None:
            self.sent.insert(0, self.plan.head)

    def upstream_unreachable(self, message: str) -> None:
        if not self.finished:
            self.fail(503, message)

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        self.sent = None
        self.client.clear_deadline(AWAITING_RESPONSE)
        # Without framing the response ends when the upstream closes, and so must the client's.
        self.keep_alive = self.keep_alive and conn.framed and not self.plan.upgrade
        self.response_started = True
        head = hdrs.relay_response_head(conn.head, keep_alive=self.keep_alive)
        if body is None:
            self.sink.write(head)
        else:
            self.sink.writelines((head, body))  # one send for a small response

    def upstream_switched(self, conn: UpstreamConnection, early: memoryview) -> None:
        self.sent = None
        self.client.clear_deadline(AWAITING_RESPONSE)
        self.response_started = True
        self.tunnel = True
        self.keep_alive = False
        transport = self.client.transport
        transport.write(hdrs.client_response_head(101, hdrs.response_headers(conn.head), keep_alive=False, upgrade=True))
        if early:
            transport.write(early)
        if self.pending:
            conn.send(*self.pending)
            self.pending, self.pending_size = [], 0
        self.client.gate.open(AWAITING_PEER)

    def upstream_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.upstream = None
        self.plan.upstream.pool.give_back(conn, reusable)
        self.finish()

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        self.upstream = None
        if self.finished:
            return
        name = self.plan.route.cluster
        if self.tunnel:
            self.client.transport.close()
            self.finish()
        elif not conn.got_bytes:
            if conn.reused and not self.retried and self.sent is not None:
                # A pooled connection the cluster had already closed: one retry on a fresh one.
                self.retried = True
                if not self.plan.upgrade:  # an upgrade's pending bytes are early tunnel data
                    self.pending = self.sent[1:]
                self.sent = []
                self.pending_size = self.sent_size = 0
                self.plan.upstream.pool.acquire(self, fresh=True)
            else:
                self.fail(502, f'cluster "{name}" closed the connection before answering')
        elif conn.head_done and not conn.framed:
            self.finish()  # the response was delimited by the close; keep_alive is already off
        else:
            self.abort()

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        self._detach()
        log.warning("cluster %s: %s", self.plan.route.cluster, why)
        if self.response_started:
            self.abort()
        else:
            self.fail(502, f'cluster "{self.plan.route.cluster}" sent an invalid response: {why}')

    # --- endings -----------------------------------------------------------------------------

    def timed_out(self) -> None:
        cluster = self.plan.upstream.cluster
        self.fail(504, f'cluster "{cluster.name}" did not answer within {cluster.response_header_timeout:g}s')

    def fail(self, code: int, message: str, *, close: bool = False) -> None:
        """Answer with a Status in place of the upstream's response."""
        if self.response_started:
            self.abort()
            return
        self._detach()
        self.keep_alive = self.keep_alive and not close
        response = status_response(code, message, close=not self.keep_alive)
        if self is not self.client.active:
            self.plan, self.canned = None, response  # still queued: answered in its turn
            return
        self.response_started = True
        self.client.transport.write(response)
        self.finish()

    def abort(self) -> None:
        """The response cannot be completed: cut the client off so it sees a truncated message."""
        self._detach()
        self.keep_alive = False
        self.client.transport.abort()
        self.finish()

    def abandon(self) -> None:
        """The client went away: release whatever the exchange holds, right now."""
        if self.finished:
            return
        self.finished = True
        if self.upstream is not None:
            self._detach(graceful=self.tunnel)
        elif self.plan is not None:
            self.plan.upstream.pool.cancel(self)

    def _detach(self, graceful: bool = False) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            if graceful:
                conn.transport.close()  # flush what the client sent last
            else:
                conn.close()

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.client.exchange_finished(self)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "gateway", "transport", "gate", "parser", "client_ip", "url", "headers", "head_size",
        "parsing_head", "began_in_feed", "receiving", "active", "queue", "upgraded", "broken",
        "deadline", "deadline_kind", "write_paused", "tls", "limits",
    )

    def __init__(self, gateway: Gateway):
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
        self.receiving: Exchange | None = None  # the exchange whose request is being parsed
        self.active: Exchange | None = None     # the exchange whose response is being written
        self.queue: list[Exchange] = []  # pipelined requests; a list is 600 bytes smaller than a deque
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
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            if self.receiving is not None:
                self.receiving.tunnel_data(data)
            return
        if self.broken:
            return
        self.began_in_feed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            rest = data[exc.args[0]:]
            if rest and self.receiving is not None:
                self.receiving.tunnel_data(rest)
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, StatusError):
                self._refuse_stream(cause.code, cause.message)
            else:
                self._refuse_stream(400, f"malformed HTTP request: {exc}")
            return
        if self.parsing_head:
            if not self.began_in_feed:
                self.head_size += len(data)  # bytes the parser holds for a head not finished yet
            if self.head_size > self.limits.max_header_bytes:
                self._refuse_stream(431, "request header fields too large")

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing_head = True
        self.began_in_feed = True
        self.head_size = 0
        self.url = b""
        if self.active is None:
            self.set_deadline(AWAITING_HEAD, self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.limits.max_header_bytes:
            raise StatusError(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self.parsing_head = False
        self.clear_deadline(AWAITING_HEAD)
        parser = self.parser
        head = RequestHead(parser.get_method(), self.url, parser.get_http_version().encode(),
                           self.headers, self.client_ip, parser.should_upgrade())
        self.headers = []
        # After an upgrade request the parser takes no further requests on this connection.
        keep_alive = parser.should_keep_alive() and not head.upgrade
        try:
            plan = self.gateway.plan(head)
        except StatusError as err:
            # A refused request whose body the client may hold back (Expect) must end the connection.
            close = err.close or not keep_alive or any(n.lower() == b"expect" for n, _ in head.headers)
            exchange = Exchange(self, None, not close, status_response(err.code, err.message, close=close, reason=err.reason))
        else:
            if plan.route.kind == HEALTH:
                exchange = Exchange(self, None, keep_alive, HEALTHY + (b"\r\nok" if keep_alive else b"Connection: close\r\n\r\nok"))
            else:
                exchange = Exchange(self, plan, keep_alive)
        self.receiving = exchange
        self._enqueue(exchange)

    def on_body(self, body: bytes) -> None:
        self.receiving.request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.receiving
        exchange.request_complete()
        if not exchange.plan or not exchange.plan.upgrade:
            self.receiving = None

    # --- exchanges ---------------------------------------------------------------------------

    def _enqueue(self, exchange: Exchange) -> None:
        if self.active is None and not self.queue:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.gate.close(PIPELINED)

    def exchange_finished(self, exchange: Exchange) -> None:
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
        else:
            self.set_deadline(IDLE, self.limits.idle_timeout)

    def _refuse_stream(self, code: int, message: str) -> None:
        """The byte stream itself is bad: answer after the responses already owed, then close."""
        self.broken = True
        self.gate.close(PIPELINED)
        unfinished = self.receiving
        if unfinished is not None and not unfinished.request_done and not unfinished.finished:
            unfinished.fail(code, message, close=True)  # its body can never be completed
        else:
            self._enqueue(Exchange(self, None, False, status_response(code, message, close=True)))

    # --- deadlines, checked by the worker's once-a-second sweep ------------------------------

    def set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.gateway.loop.time() + seconds

    def clear_deadline(self, kind: int) -> None:
        if self.deadline_kind == kind:
            self.deadline = 0.0

    def deadline_passed(self) -> None:
        kind, self.deadline = self.deadline_kind, 0.0
        if kind == AWAITING_RESPONSE and self.active is not None and self.active.plan is not None:
            self.active.timed_out()
        elif kind == AWAITING_HEAD and self.active is None and self.parsing_head:
            self._refuse_stream(408, "timed out reading the request head")
        else:
            self.transport.close()
