"""The gateway's own requests to a cluster, sent through the same pool as the proxied ones.

`request()` is for what the gateway asks a cluster itself (SubjectAccessReviews, management
handlers): it authenticates with the gateway's own credential, impersonates nobody unless the
caller passes Impersonate-* headers, and collects the whole response body. Proxied requests
never come here; they stream through proxy.ProxyExchange. Both are upstream.UpstreamExchange.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httptools

from .headers import NO_BODY_METHODS, response_headers

if TYPE_CHECKING:
    from .clusters import Upstream
    from .upstream import UpstreamConnection

DEFAULT_RESPONSE_LIMIT = 64 * 1024 * 1024
# Set by request() itself; a second one from the caller would make the message ambiguous.
_RESERVED_HEADERS = frozenset(("host", "authorization", "content-length", "transfer-encoding", "connection",
                               "upgrade"))
_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class UpstreamRequestError(Exception):
    """No HTTP answer could be had; `code` is the status the gateway would answer with."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def request(upstream: Upstream, method: str, path: str, body: bytes = b"",
                  headers: Iterable[tuple[str, str]] = (), *, timeout: float | None = None,
                  limit: int = DEFAULT_RESPONSE_LIMIT) -> tuple[int, bytes]:
    """Send one request to `upstream`'s cluster; returns its status and de-chunked body.

    `path` is sent as given (already percent-encoded, query included) below the upstream's
    `path_prefix` (a virtual cluster behind its host's service proxy); `headers` must not
    repeat the framing, Host or Authorization headers this function sets. Raises UpstreamRequestError when the cluster cannot be reached,
    breaks HTTP, takes longer than `timeout` (default: the cluster's response_header_timeout)
    for the whole exchange, or sends more than `limit` body bytes.
    """
    head = _request_head(upstream, method, upstream.path_prefix + path, body, headers)
    loop = upstream.pool.loop
    exchange = InternalExchange(upstream, method.encode(), head, body, loop.create_future(), limit)
    timer = loop.call_later(timeout or upstream.cluster.response_header_timeout, exchange.timed_out)
    upstream.pool.acquire(exchange)
    try:
        return await exchange.future
    finally:
        timer.cancel()
        exchange.abandon()  # cancelled or timed out: let go of the connection


def _request_head(upstream: Upstream, method: str, path: str, body: bytes,
                  headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{_clean(method)} {_clean(path)} HTTP/1.1\r\n".encode(), upstream.host_line, upstream.credential]
    for name, value in headers:
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by request() itself")
        lines.append(f"{_clean(name)}: {_clean(value)}\r\n".encode())
    if body or method.encode() not in NO_BODY_METHODS:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)


def _clean(text: str) -> str:
    # Callers are the gateway's own code, but one stray CR/LF would smuggle a second request.
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"request line or header contains CR, LF or NUL: {text!r}")
    return text


class InternalExchange:
    """One gateway-originated request: what Pool and UpstreamConnection call on an exchange."""

    __slots__ = ("target", "method", "upgrade", "head", "body", "future", "limit", "sink", "upstream", "status",
                 "received", "received_size", "decoder", "request_done", "finished", "retried", "bytes_out")

    def __init__(self, target: Upstream, method: bytes, head: bytes, body: bytes, future: asyncio.Future,
                 limit: int):
        self.target = target
        self.method = method
        self.upgrade = False  # the gateway's own requests never switch protocols
        self.head = head
        self.body = body
        self.bytes_out = 0
        self.future = future
        self.limit = limit
        self.sink = self  # the upstream connection writes the response body to `write`
        self.upstream: UpstreamConnection | None = None
        self.status = 0
        self.received: list[bytes] = []
        self.received_size = 0
        self.decoder: httptools.HttpResponseParser | None = None
        self.request_done = False
        self.finished = False
        self.retried = False

    # --- the response body, as the upstream connection relays it -----------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.decoder is not None:
            self.decoder.feed_data(bytes(data))  # framing already validated by the connection's parser
        else:
            self.on_body(bytes(data))

    def on_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.received_size += len(data)
        if self.received_size > self.limit:
            self._detach()
            self._fail(502, f'cluster "{self.target.cluster.name}" sent a response larger than {self.limit} bytes')
        else:
            self.received.append(data)

    # --- driven by the pool and the upstream connection --------------------------------------

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.exchange = self
        conn.send(self.head, self.body)
        self.request_done = True

    def upstream_unreachable(self, message: str) -> None:
        self._fail(503, message)

    def peer_full(self, full: bool) -> None:
        """Nothing to hold back: the whole request was handed to the transport at once."""

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        self.status = conn.status
        if any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in response_headers(conn.head)):
            # The connection relays chunked framing as it arrived; a parser of our own removes it.
            self.decoder = httptools.HttpResponseParser(self)
            self.decoder.feed_data(_CHUNKED_HEAD)
        if body is not None:
            self.write(body)

    def upstream_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.upstream = None
        self.target.pool.give_back(conn, reusable)
        self._succeed()

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        self.upstream = None
        if self.finished:
            return
        if not conn.got_bytes and conn.reused and not self.retried:
            # A pooled connection the cluster had already closed: one retry on a fresh one.
            self.retried = True
            self.request_done = False
            self.target.pool.acquire(self, fresh=True)
        elif conn.head_done and not conn.framed:
            self._succeed()  # the body was delimited by the close
        else:
            self._fail(502, f'cluster "{self.target.cluster.name}" closed the connection before answering')

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        self._detach()
        self._fail(502, f'cluster "{self.target.cluster.name}" sent an invalid response: {why}')

    # --- endings -----------------------------------------------------------------------------

    def timed_out(self) -> None:
        if not self.finished:
            self._detach()
            self._fail(504, f'cluster "{self.target.cluster.name}" did not answer in time')

    def abandon(self) -> None:
        if not self.finished:
            self.finished = True
            if self.upstream is not None:
                self._detach()
            else:
                self.target.pool.cancel(self)

    def _detach(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.close()

    def _succeed(self) -> None:
        if not self.finished:
            self.finished = True
            if not self.future.done():
                self.future.set_result((self.status, b"".join(self.received)))

    def _fail(self, code: int, message: str) -> None:
        if not self.finished:
            self.finished = True
            if not self.future.done():
                self.future.set_exception(UpstreamRequestError(code, message))
