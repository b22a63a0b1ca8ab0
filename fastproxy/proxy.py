"""The cluster proxy handler: plan a request for a cluster, then relay it through the pool.

`ClusterProxy.plan` is pure apart from reading caches: authenticate, check the key's scope,
rewrite the headers and produce the exact upstream request head, or raise a StatusError.
`ProxyExchange` carries one request to its upstream connection and the response back, streaming
both bodies with backpressure, or turns into a byte tunnel after a 101.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from . import headers as hdrs
from .auth.credentials import Authenticator
from .auth.identity import Identity
from .auth.impersonation import AccessReviewer, Check, ImpersonationReviewer, NestedIdentity, parse_impersonation
from .auth.requestinfo import is_discovery
from .auth.scopes import check_scope, reaches_cluster
from .clusters import ClusterRegistry, Upstream
from .config import ServerConfig
from .context import Observers, RequestContext, RequestHead
from .exchange import AWAITING_RESPONSE, Connection, Responder
from .flow import AWAITING_PEER, PEER_FULL, PENDING_LIMIT
from .status import StatusError
from .watchshare import joiner_refusal, review_outcome
from .watchstream import WatchStreams, watch_subscriber

if TYPE_CHECKING:
    from .upstream import UpstreamConnection

log = logging.getLogger("fastproxy.proxy")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RETAIN_LIMIT = 1024 * 1024  # request bytes kept for one retry on a stale pooled connection
# How long a cluster's answer on whether a watcher may join a stream run as the gateway is reused:
# long enough that a fleet of joiners asks once, short enough that a revoked role soon tells.
JOINER_ALLOWED_TTL = 5.0
JOINER_DENIED_TTL = 2.0
_LONG_RUNNING_PARAMS = frozenset(("watch", "follow"))


@dataclass(slots=True)
class ProxyPlan:
    """What to send to the cluster for a request the gateway accepted."""

    identity: Identity
    upstream: Upstream
    head: bytes                 # the upstream request head
    chunked: bool = False       # the request body is chunked (re-framed by the gateway)
    upgrade: bool = False
    long_running: bool = False  # watch / follow: no response-head timeout
    expect_continue: bool = False
    nested: NestedIdentity | None = None  # asked-for impersonation the cluster must allow first


class ClusterProxy:
    """The handler of /kubernetes/cluster/NAME/: one per worker, one ProxyExchange per request."""

    def __init__(self, server: ServerConfig, clusters: ClusterRegistry, authenticator: Authenticator,
                 loop: asyncio.AbstractEventLoop):
        self.server = server
        self.clusters = clusters
        self.authenticator = authenticator
        self.loop = loop
        self.reviewer = ImpersonationReviewer()
        self.reviews: set[asyncio.Task] = set()  # running impersonation reviews, kept from collection
        self.watches = WatchStreams(loop) if server.share_watches else None
        self.joiners = AccessReviewer(JOINER_ALLOWED_TTL, denied_ttl=JOINER_DENIED_TTL)
        self.joiner_outcomes: dict[str, int] | None = None  # joiner reviews by outcome, when metrics count them

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                 keep_alive: bool) -> Responder:
        plan = self.plan(ctx)
        if plan.long_running and self.watches is not None:
            shared = watch_subscriber(client, ctx, observers, keep_alive, self, plan)
            if shared is not None:
                return shared
        return ProxyExchange(client, ctx, observers, keep_alive, self, plan)

    def plan(self, ctx: RequestContext) -> ProxyPlan:
        """Decide what goes to the cluster, or raise StatusError. No I/O; fills in ctx.identity."""
        head, where = ctx.head, ctx.route
        found = ctx.found = hdrs.scan_client_headers(head.headers)
        upgrade = requested_upgrade(head, found) if head.upgrade else None
        identity = ctx.identity = self.authenticator.authenticate(hdrs.bearer_credential(found, upgrade), where.cluster)
        if identity.scope is not None:
            info = ctx.info
            # Discovery reveals no objects; without it kubectl cannot use a narrow scope at all.
            if not (is_discovery(info) and reaches_cluster(identity.scope, where.cluster)):
                denial = check_scope(identity.scope, info, "Cluster", where.cluster)
                if denial is not None:
                    raise StatusError(403, denial)
        upstream = self.clusters.get(where.cluster)
        if upstream is None:
            raise StatusError(404, f'cluster "{where.cluster}" not found')
        return self.relay_plan(ctx, found, upgrade, identity, upstream, where.path)

    def relay_plan(self, ctx: RequestContext, found: hdrs.ClientHeaders, upgrade: bytes | None, identity: Identity,
                   upstream: Upstream, path: str) -> ProxyPlan:
        """The plan for a request `identity` may send to `upstream` as `path` (and the route's query)."""
        if found.impersonation is None:
            nested, impersonation = None, identity.impersonation
        else:
            nested = parse_impersonation(found.impersonation)
            impersonation = nested.headers()  # sent only once the cluster allows it
        return forwarding_plan(ctx, found, found.kept, identity, upstream, impersonation, upgrade,
                               self.server.max_body_bytes, nested, path=path)

    def review_impersonation(self, plan: ProxyPlan, done: Callable[[StatusError | None], None]) -> None:
        """Ask the cluster whether plan.identity may act as plan.nested; `done` gets the refusal or None."""
        assert plan.nested is not None
        review = self.loop.create_task(self.reviewer.refusal(plan.upstream, plan.identity, plan.nested))
        self.reviews.add(review)

        def reviewed(task: asyncio.Task) -> None:
            self.reviews.discard(task)
            if task.cancelled():
                return  # shutting down
            try:
                refusal = task.result()
            except Exception:
                log.exception("cluster %s: impersonation review failed", plan.upstream.cluster.name)
                refusal = StatusError(500, "impersonation could not be checked")
            done(refusal)
        review.add_done_callback(reviewed)

    def review_joiner(self, plan: ProxyPlan, checks: tuple[Check, ...],
                      done: Callable[[StatusError | None], None]) -> None:
        """Ask the cluster whether the watch's effective identity (the nested one with `--as`) holds
        every permission `checks` name; `done` gets the refusal or None, at once when cached."""
        who = plan.identity if plan.nested is None else plan.nested
        answers = [self.joiners.answer(plan.upstream, who, check) for check in checks]

        def settle(outcomes: list) -> None:
            if any(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes):
                return  # shutting down
            if self.joiner_outcomes is not None:
                self.joiner_outcomes[review_outcome(outcomes)] += 1
            done(joiner_refusal(who.user, checks, outcomes, plan.upstream.cluster.name))
        if all(answer.done() for answer in answers):  # cached: no loop turn for the fleet's later joiners
            settle([_outcome(answer) for answer in answers])
            return
        # Gathered, not awaited one by one: an answer is shared, and gather never cancels it uncalled.
        asyncio.gather(*answers, return_exceptions=True).add_done_callback(
            lambda gathered: None if gathered.cancelled() else settle(gathered.result()))


def _outcome(answer: asyncio.Future) -> object:
    """A settled future as gather(return_exceptions=True) reports it."""
    if answer.cancelled():
        return asyncio.CancelledError()
    return answer.exception() or answer.result()


def requested_upgrade(head: RequestHead, found: hdrs.ClientHeaders) -> bytes | None:
    """The protocol a request asks to switch to (SPDY for exec and port-forward, or websocket), if any."""
    if not head.upgrade:
        return None
    if found.upgrade is None or found.upgrade.lower() not in hdrs.UPGRADE_PROTOCOLS:
        raise StatusError(400, "only SPDY/3.1 and websocket upgrades are supported", close=True)
    return found.upgrade


def forwarding_plan(ctx: RequestContext, found: hdrs.ClientHeaders, kept: hdrs.Headers, identity: Identity,
                    upstream: Upstream, identity_lines: bytes, upgrade: bytes | None, max_body_bytes: int,
                    nested: NestedIdentity | None = None, *, path: str | None = None) -> ProxyPlan:
    """The plan for an accepted request: the client's `kept` headers, then the upstream's own
    credential and `identity_lines` (who the caller is, as the upstream reads it); the body
    framed as the gateway parsed it; sent as `path` (default: the route's) with the route's query.
    StatusError 413 for a body larger than `max_body_bytes`."""
    head, where = ctx.head, ctx.route
    if path is None:
        path = where.path
    method = head.method
    content_length = found.content_length
    if max_body_bytes and content_length is not None and content_length > max_body_bytes:
        raise StatusError(413, f"request body larger than {max_body_bytes} bytes", close=True)
    if found.chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    elif content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    elif method not in hdrs.NO_BODY_METHODS:
        framing = b"Content-Length: 0\r\n"
    else:
        framing = b""
    upstream_target = path + "?" + where.query if where.query else path
    version = b"1.0" if head.version == b"1.0" else b"1.1"
    forwarded_for = head.client_ip if found.forwarded_for is None else found.forwarded_for + b", " + head.client_ip
    # Positional: keywords to a class call cost a dict per request.
    return ProxyPlan(
        identity, upstream,
        hdrs.upstream_request_head(
            method, upstream_target.encode("latin-1"), version, kept,
            host=upstream.host_line, credential=upstream.credential,
            impersonation=identity_lines, forwarded_for=forwarded_for,
            framing=framing, upgrade=upgrade),
        found.chunked,                                   # chunked
        upgrade is not None,                             # upgrade
        where.query != "" and is_long_running(where.query),  # long_running
        found.expect_continue and version == b"1.1",     # expect_continue
        nested,
    )


def is_long_running(query: str) -> bool:
    """Watches and followed logs stream for as long as the upstream likes."""
    if "watch" not in query and "follow" not in query:
        return False
    return any(name in _LONG_RUNNING_PARAMS and value.lower() not in ("0", "false")
               for name, value in parse_qsl(query, keep_blank_values=True))


class ProxyExchange(Responder):
    """One proxied request and its response; implements upstream.UpstreamExchange."""

    __slots__ = (
        "proxy", "plan", "method", "sink", "upstream", "pending", "pending_size", "sent", "sent_size",
        "retried", "response_started", "bytes_out",
    )

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 proxy: ClusterProxy, plan: ProxyPlan):
        # Responder's fields set here rather than by super().__init__: one call less per request.
        self.client = client
        self.ctx = ctx
        self.observers = observers
        self.keep_alive = keep_alive
        self.finished = False
        self.request_done = False
        self.tunnel = False
        self.upgrade = plan.upgrade
        self.canned = b""
        self.proxy = proxy
        self.plan = plan
        self.method = ctx.head.method
        self.sink = client.transport      # where the upstream connection writes response bytes
        self.upstream: UpstreamConnection | None = None
        self.pending: list[bytes] = []    # request bytes waiting for the upstream connection
        self.pending_size = 0
        self.sent: list[bytes] | None = []  # request bytes kept until the first response byte
        self.sent_size = 0
        self.retried = False
        self.response_started = False
        self.bytes_out = 0

    # --- driven by the client connection -----------------------------------------------------

    def serve(self) -> None:
        plan = self.plan
        if not plan.long_running and not plan.upgrade:
            self.client.set_deadline(AWAITING_RESPONSE, plan.upstream.cluster.response_header_timeout)
        if plan.nested is not None:
            # The connection holds this exchange (and those behind it) until the cluster answers.
            self.proxy.review_impersonation(plan, self.impersonation_reviewed)
            return
        if plan.expect_continue:
            self.client.transport.write(CONTINUE)
        plan.upstream.pool.acquire(self)

    def impersonation_reviewed(self, refusal: StatusError | None) -> None:
        if self.finished:
            return  # timed out or the client left meanwhile
        if refusal is not None:
            # A client still holding back its body (Expect) cannot go on with this connection.
            self.refuse(refusal, close=self.plan.expect_continue and not self.request_done)
            return
        if self.plan.expect_continue:
            self.client.transport.write(CONTINUE)
        self.plan.upstream.pool.acquire(self)

    def request_body(self, data: bytes) -> None:
        if self.finished or self.canned:
            return  # a body nobody will read: parsed and dropped
        ctx = self.ctx
        ctx.bytes_in += len(data)
        limit = self.proxy.server.max_body_bytes
        if limit and ctx.bytes_in > limit:
            self.fail(413, f"request body larger than {limit} bytes", close=True)
            return
        if self.plan.chunked:
            # Re-framed by the gateway, so the upstream reads exactly the message the gateway parsed.
            self._forward(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._forward(data)

    def request_complete(self) -> None:
        self.request_done = True
        if self.plan.chunked and not self.finished and not self.canned:
            self._forward(b"0\r\n\r\n")

    def tunnel_data(self, data: bytes) -> None:
        """Client bytes after an upgrade request: held until the upstream agrees to switch."""
        if self.finished or self.canned:
            return
        self.ctx.bytes_in += len(data)
        if self.tunnel:
            self.upstream.transport.write(data)
        else:
            self._hold(data)

    def writing_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def writing_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

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
        head = self.plan.head
        if self.pending and not self.plan.upgrade:  # an upgrade's early tunnel bytes wait for the 101
            conn.send(head, *self.pending)
            self.pending, self.pending_size = [], 0
            self.client.gate.open(AWAITING_PEER)  # only bytes held here close it
        else:
            conn.transport.write(head)
        if self.sent is not None:
            self.sent.insert(0, head)

    def upstream_unreachable(self, message: str) -> None:
        if not self.finished:
            self.fail(503, message)

    def _response_begins(self, status: int) -> None:
        self.sent = None
        self.client.clear_deadline(AWAITING_RESPONSE)
        self.response_started = True
        self.ctx.status = status
        if self.observers.active:
            self.ctx.first_byte = time.monotonic()

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        # _response_begins, inlined: this runs for every response.
        self.sent = None
        self.client.clear_deadline(AWAITING_RESPONSE)
        self.response_started = True
        ctx = self.ctx
        ctx.status = conn.status
        if self.observers.active:
            ctx.first_byte = time.monotonic()
            if conn.complete:  # the whole response came in this read: its end is this clock read too
                ctx.ended = ctx.first_byte
        # Without framing the response ends when the upstream closes, and so must the client's.
        self.keep_alive = self.keep_alive and conn.framed and not self.plan.upgrade
        head = hdrs.relay_response_head(conn.head, keep_alive=self.keep_alive)
        if ctx.id_line:
            head = head[:-2] + ctx.id_line + b"\r\n"
        if body is None:
            self.sink.write(head)
            self.bytes_out += len(head)
        else:
            self.sink.writelines((head, body))  # one send for a small response
            self.bytes_out += len(head) + len(body)

    def upstream_switched(self, conn: UpstreamConnection, early: memoryview) -> None:
        self._response_begins(101)
        self.tunnel = True
        self.keep_alive = False
        transport = self.client.transport
        head = hdrs.client_response_head(101, hdrs.response_headers(conn.head), keep_alive=False, upgrade=True)
        if self.ctx.id_line:
            head = head[:-2] + self.ctx.id_line + b"\r\n"
        transport.write(head)
        self.bytes_out += len(head) + len(early)
        if early:
            transport.write(early)
        if self.pending:
            conn.send(*self.pending)
            self.pending, self.pending_size = [], 0
        self.client.gate.open(AWAITING_PEER)

    def upstream_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.upstream = None
        if reusable:  # Pool.give_back, inlined: it runs for every response
            self.plan.upstream.pool.release(conn)
        else:
            conn.close()
        self.finish()

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        self.upstream = None
        if self.finished:
            return
        name = self.ctx.route.cluster
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
        elif not conn.head_done:  # nothing relayed yet: the client can still be told why
            self.fail(502, f'cluster "{name}" closed the connection in the middle of its response head')
        elif not conn.framed:
            self.finish()  # the response was delimited by the close; keep_alive is already off
        else:
            self.abort()

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        self._detach()
        log.warning("cluster %s: %s", self.ctx.route.cluster, why)
        if self.response_started:
            self.abort()
        else:
            self.fail(502, f'cluster "{self.ctx.route.cluster}" sent an invalid response: {why}')

    # --- endings -----------------------------------------------------------------------------

    def timed_out(self) -> None:
        cluster = self.plan.upstream.cluster
        self.fail(504, f'cluster "{cluster.name}" did not answer within {cluster.response_header_timeout:g}s')

    def fail(self, code: int, message: str, *, close: bool = False, reason: str | None = None,
             details: dict[str, Any] | None = None) -> None:
        """Answer with a Status in place of the upstream's response."""
        if self.response_started:
            self.abort()
            return
        self._detach()
        self.response_started = True
        super().fail(code, message, close=close, reason=reason, details=details)

    def abort(self) -> None:
        """The response cannot be completed: cut the client off so it sees a truncated message."""
        self._detach()
        self.keep_alive = False
        self.client.transport.abort()
        self.finish()

    def abandon(self) -> None:
        if self.finished:
            return
        if self.upstream is not None:
            self._detach(graceful=self.tunnel)
        elif not self.canned:
            self.plan.upstream.pool.cancel(self)
        super().abandon()

    def _observed_end(self) -> None:
        observers = self.observers
        if observers.active:  # Responder._observed_end, inlined: it runs for every request
            ctx = self.ctx
            ctx.bytes_out += self.bytes_out
            if not ctx.ended:
                ctx.ended = time.monotonic()
            observers.finish(ctx)

    def _detach(self, graceful: bool = False) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            if graceful:
                conn.transport.close()  # flush what the client sent last
            else:
                conn.close()
