"""Shared upstream watch streams, the I/O part: one upstream exchange fanned out to subscribers.

`WatchStreams` (one per worker) finds or opens the stream a shareable watch joins (the decisions
are in watchshare.py). A `SharedStream` is an upstream.UpstreamExchange whose sink decodes the
chunked JSON lines, records each event once and writes the same chunk bytes to every subscriber.
Each `WatchSubscriber` is its client's Responder, so observers see every client's own request.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

import httptools

from .exchange import Connection, Responder
from .watchshare import (
    EventType,
    WatchMemory,
    WatchRequest,
    parse_event,
    shareable_watch,
    stream_identity,
    upstream_target,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from .clusters import Upstream
    from .context import Observers, RequestContext
    from .proxy import ClusterProxy, ProxyPlan
    from .status import StatusError
    from .upstream import Sink, UpstreamConnection

    # Asks the cluster something about a joiner, then calls back with the refusal or None.
    Review = Callable[[Callable[[StatusError | None], None]], None]


log = logging.getLogger("fastproxy.watchstream")

LINGER_SECONDS = 2.0      # an unsubscribed stream stays open this long for the next joiner
GONE_SECONDS = 5.0        # a version the cluster called too old (410) is answered so this long
GONE_KEPT = 1024          # ...for at most this many (key, version) pairs
ERROR_BODY_LIMIT = 64 * 1024
_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\n"
                b"Transfer-Encoding: chunked\r\n")
_TERMINATOR = b"0\r\n\r\n"


def watch_subscriber(client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                     proxy: ClusterProxy, plan: ProxyPlan,
                     subscriber: type[WatchSubscriber] | None = None) -> WatchSubscriber | None:
    """The shared-stream responder for a planned watch, or None when it keeps a stream of its own."""
    head = ctx.head
    if head.method != b"GET" or plan.upgrade or proxy.watches is None:
        return None
    accept = next((value for name, value in head.headers if name.lower() == b"accept"), None)
    target = plan.head[4:plan.head.index(b" HTTP/1.")].decode("latin-1")
    own_lines = plan.identity.impersonation if plan.nested is None else plan.nested.headers()
    identity_lines, checks = stream_identity(plan.upstream.cluster.share_watches_across_identities, own_lines,
                                             ctx.info)
    request = shareable_watch(plan.upstream.cluster.name, identity_lines, target, accept, head.version)
    if request is None:
        return None
    # Run in order before the joiner joins: may the caller act as whom it asked to, may that one watch.
    reviews: list[Review] = []
    if plan.nested is not None:
        reviews.append(partial(proxy.review_impersonation, plan))
    if checks:
        reviews.append(partial(proxy.review_joiner, plan, checks))
    return (subscriber or WatchSubscriber)(client, ctx, observers, keep_alive, proxy.watches, request, plan.upstream,
                                           identity_lines, reviews)


class StreamState(enum.Enum):
    OPENING = 1   # asked upstream, no answer yet
    LIVE = 2      # the upstream said 200: events flow
    ENDED = 3


class WatchStreams:
    """The shared streams of one worker, by WatchRequest.key."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.streams: dict[tuple[str, bytes, str, str], list[SharedStream]] = {}
        self.opened = 0  # upstream streams opened, for tests and metrics
        # (key, version) -> (until when, the cluster's ERROR event) for versions it called too old
        self.gone: dict[tuple[tuple[str, bytes, str, str], str], tuple[float, bytes]] = {}

    def join(self, subscriber: WatchSubscriber, upstream: Upstream, identity_lines: bytes) -> None:
        request = subscriber.request
        gone = self.gone.get((request.key, request.resource_version))
        if gone is not None and self.loop.time() < gone[0]:
            subscriber.begin([gone[1]])  # what the cluster answered this version, then the end it gave
            subscriber.end()
            return
        for stream in self.streams.get(request.key, ()):
            # A cluster reloaded since has a new handle: its joiners need a stream to it as it is now.
            if stream.state is not StreamState.ENDED and stream.target is upstream and stream.add(subscriber):
                return
        stream = SharedStream(self, request, upstream, identity_lines)
        self.streams.setdefault(request.key, []).append(stream)
        self.opened += 1
        stream.add(subscriber)
        upstream.pool.acquire(stream)

    def forget(self, stream: SharedStream) -> None:
        streams = self.streams.get(stream.key, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self.streams.pop(stream.key, None)

    def remember_gone(self, key: tuple[str, bytes, str, str], version: str, error: bytes) -> None:
        now = self.loop.time()
        self.gone = {entry: value for entry, value in self.gone.items() if now < value[0]}
        while len(self.gone) >= GONE_KEPT:
            del self.gone[next(iter(self.gone))]  # the oldest
        self.gone[(key, version)] = (now + GONE_SECONDS, error)


class SharedStream:
    """One upstream watch and its subscribers; implements upstream.UpstreamExchange."""

    def __init__(self, streams: WatchStreams, request: WatchRequest, upstream: Upstream, identity_lines: bytes):
        self.streams = streams
        self.key = request.key
        self.version = request.resource_version
        self.target = upstream
        self.memory = WatchMemory(request.resource_version)
        self.subscribers: list[WatchSubscriber] = []
        self.state = StreamState.OPENING
        self.method = b"GET"
        self.upgrade = False
        self.sink: Sink = self
        self.finished = False
        self.request_done = False
        self.bytes_out = 0
        self.conn: UpstreamConnection | None = None
        self.decoder: httptools.HttpResponseParser | None = None
        self.partial = b""
        self.error_status = 0  # a refusal's status, whose body goes to every subscriber
        self.error_body = b""
        self.linger: asyncio.TimerHandle | None = None
        self.head = (b"GET " + upstream_target(request).encode("latin-1") + b" HTTP/1.1\r\n"
                     + upstream.host_line + upstream.credential + identity_lines
                     + b"Accept: application/json\r\n\r\n")

    # --- subscribers ---------------------------------------------------------------------------

    def add(self, subscriber: WatchSubscriber) -> bool:
        """Subscribe if the memory serves this joiner exactly; it then gets what it missed."""
        backlog = self.memory.catch_up(subscriber.request.resource_version, subscriber.request.bookmarks)
        if backlog is None:
            return False
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.subscribers.append(subscriber)
        subscriber.stream = self
        if self.state is StreamState.LIVE:
            subscriber.begin(backlog)
        return True

    def remove(self, subscriber: WatchSubscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
        if not self.subscribers and self.state is not StreamState.ENDED and self.linger is None:
            self.linger = self.streams.loop.call_later(LINGER_SECONDS, self.close)

    # --- the upstream's response body ---------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.decoder is not None:
            self.decoder.feed_data(bytes(data))  # framing already checked by the connection's parser
        else:
            self.on_body(bytes(data))

    def on_body(self, data: bytes) -> None:
        if self.state is not StreamState.LIVE:
            if len(self.error_body) < ERROR_BODY_LIMIT:
                self.error_body += data
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self.event(line + b"\n")

    def event(self, line: bytes) -> None:
        try:
            event = parse_event(line)
        except ValueError:
            log.warning("cluster %s: a watch line that is not an event; the shared stream ends",
                        self.target.cluster.name)
            self.close(cut=True)
            return
        self.memory.record(event)
        if self.memory.gone is not None:
            self.streams.remember_gone(self.key, self.version, self.memory.gone)
        chunk, size = event.chunk, len(event.chunk)
        bookmark = event.type is EventType.BOOKMARK
        for subscriber in tuple(self.subscribers):  # a slow one may leave while written to
            if not bookmark or subscriber.request.bookmarks:
                subscriber.ctx.bytes_out += size
                subscriber.client.transport.write(chunk)

    # --- driven by the pool and the upstream connection --------------------------------------

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self
        conn.send(self.head)
        self.request_done = True

    def upstream_unreachable(self, message: str) -> None:
        self._end(503, message.encode())

    def peer_full(self, full: bool) -> None:
        """The request is one head, written at once: nothing to hold back."""

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        if conn.status == 200:
            self.state = StreamState.LIVE
            for subscriber in self.subscribers:
                subscriber.begin(self.memory.catch_up(subscriber.request.resource_version,
                                                      subscriber.request.bookmarks) or [])
        else:
            self.error_status = conn.status
        if b"chunked" in conn.head.lower():
            self.decoder = httptools.HttpResponseParser(self)
            self.decoder.feed_data(_CHUNKED_HEAD)
        if body is not None:
            self.write(body)

    def upstream_switched(self, conn: UpstreamConnection, early: memoryview) -> None:
        self.upstream_broken(conn, "unexpected protocol switch")

    def upstream_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.conn = None
        self.target.pool.give_back(conn, reusable)
        self._end(self.error_status or 502, self.error_body)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        self.conn = None
        # Lost mid-body: cut off, as a watch of its own would be; a body delimited by the close has ended.
        self._end(self.error_status or 502, self.error_body or b"the cluster closed the watch", cut=conn.framed)

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        log.warning("cluster %s: %s", self.target.cluster.name, why)
        self.close(cut=True)

    # --- endings -------------------------------------------------------------------------------

    def close(self, cut: bool = False) -> None:
        """Nobody wants the stream any more (or it broke: `cut` its subscribers off): let go of the
        upstream connection."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        elif self.state is StreamState.OPENING:
            self.target.pool.cancel(self)
        self._end(502, b"the watch ended", cut=cut)

    def _end(self, status: int, body: bytes, cut: bool = False) -> None:
        if self.state is StreamState.ENDED:
            return
        was_live = self.state is StreamState.LIVE
        self.state = StreamState.ENDED
        self.finished = True
        if self.linger is not None:
            self.linger.cancel()
        self.streams.forget(self)
        for subscriber in tuple(self.subscribers):
            if not was_live:
                subscriber.answer(status, body)
            elif cut:
                subscriber.cut()
            else:
                subscriber.end()
        self.subscribers.clear()


class WatchSubscriber(Responder):
    """One client's watch, served from a shared stream."""

    __slots__ = ("streams", "request", "upstream", "identity_lines", "reviews", "stream", "timer", "began")

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 streams: WatchStreams, request: WatchRequest, upstream: Upstream, identity_lines: bytes,
                 reviews: list[Review] | None = None):
        super().__init__(client, ctx, observers, keep_alive)
        self.streams = streams
        self.request = request
        self.upstream = upstream
        self.identity_lines = identity_lines
        self.reviews = reviews or []  # the cluster's checks still to pass, each calling `reviewed`
        self.stream: SharedStream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.began = False

    def serve(self) -> None:
        self.reviewed(None)

    def reviewed(self, refusal: StatusError | None) -> None:
        if self.finished:
            return
        if refusal is not None:
            self.refuse(refusal)
            return
        if self.reviews:
            self.reviews.pop(0)(self.reviewed)
            return
        if self.request.timeout:
            self.timer = self.streams.loop.call_later(self.request.timeout, self.end)
        self.streams.join(self, self.upstream, self.identity_lines)

    def begin(self, backlog: list[bytes]) -> None:
        """The stream is live: the response head, then what this joiner missed."""
        self.began = True
        ctx = self.ctx
        ctx.status = 200
        if self.observers.active:
            ctx.first_byte = time.monotonic()
        head = _STREAM_HEAD + ctx.id_line + b"\r\n"
        ctx.bytes_out += len(head) + sum(map(len, backlog))
        self.client.transport.writelines((head, *backlog))

    def writing_paused(self) -> None:
        """Past its write buffer's bound: ended alone, as the API server ends a slow watcher."""
        self.keep_alive = False
        self.end()

    def end(self) -> None:
        """End this client's stream cleanly (its timeout, the upstream's end, or too slow)."""
        if self.finished:
            return
        if not self.began:
            self.answer(504, b"the watch ended before it began")
            return
        self._leave()
        self.ctx.bytes_out += len(_TERMINATOR)
        self.client.transport.write(_TERMINATOR)
        if not self.keep_alive:
            self.client.transport.close()
        self.finish()

    def cut(self) -> None:
        """The upstream stream broke: a truncated response, never a clean end the client would trust."""
        if self.finished:
            return
        self._leave()
        self.keep_alive = False
        self.client.transport.abort()
        self.finish()

    def answer(self, status: int, body: bytes) -> None:
        """The upstream refused the watch: this client gets the same answer."""
        self._leave()
        if status == 200:
            status = 502
        if body.startswith(b"{"):
            self.respond(b"HTTP/1.1 %d \r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (status, len(body), self.ctx.id_line, body), status)
        else:
            self.fail(status, body.decode("utf-8", "replace"))

    def abandon(self) -> None:
        self._leave()
        super().abandon()

    def _leave(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.remove(self)
