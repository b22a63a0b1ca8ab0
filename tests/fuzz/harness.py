"""The fuzz targets: the gateway's byte-level paths, driven in-process through the real protocol
classes and parsers (ClientConnection, Gateway, ClusterProxy, UpstreamConnection, httptools) over
transports that keep what is written, so no socket or cluster is needed.

A target takes the fuzzer's bytes and raises Crash when the gateway misbehaves: an exception
other than the Status refusal escapes (from the router or from a loop callback), the client is
written something that is not a valid sequence of HTTP responses, a head planned for the cluster
carries anything but one Host, the gateway's credential and the impersonation it decided (or
carries a hop-by-hop or proxy-only header), or a re-framed body is not the body the gateway parsed.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httptools

from fastproxy.client import ClientConnection
from fastproxy.config import parse_config
from fastproxy.gateway import Gateway
from fastproxy.upstream import UpstreamConnection
from tests.fakes import FakeTransport
from tests.helpers import ACCESS_KEY

MAX_BODY_BYTES = 4096  # small, so that the fuzzer reaches the 413 part-way through a body
CLUSTER_PATH = b"/kubernetes/cluster/one/api/v1/namespaces/a/configmaps"
AUTHORIZATION = b"Authorization: Bearer " + ACCESS_KEY.encode() + b"\r\n"
# The requests whose responses the response target relays; the input's length picks one, so
# every input is also tried against a HEAD (no body) and an upgrade (the 101 switch).
RELAYED_REQUESTS = (
    b"GET " + CLUSTER_PATH + b" HTTP/1.1\r\nHost: g\r\n" + AUTHORIZATION + b"\r\n",
    b"HEAD " + CLUSTER_PATH + b" HTTP/1.1\r\nHost: g\r\n" + AUTHORIZATION + b"\r\n",
    b"GET /kubernetes/cluster/one/api/v1/namespaces/a/pods/p/exec?command=sh HTTP/1.1\r\nHost: g\r\n" + AUTHORIZATION
    + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
)
CHUNKED_REQUEST = (b"POST " + CLUSTER_PATH + b" HTTP/1.1\r\nHost: g\r\n" + AUTHORIZATION
                   + b"Transfer-Encoding: chunked\r\n\r\n")


class Crash(AssertionError):
    """The gateway misbehaved on a fuzzer's input."""


class _WatchedRouter:
    """The gateway as the connection sees it; an exception escaping the router is a crash
    (a refusal is a Status responder, never an exception)."""

    def __init__(self, gateway: Gateway, errors: list):
        self.gateway, self.errors = gateway, errors
        self.config, self.loop = gateway.config, gateway.loop
        self.observers, self.connections = gateway.observers, gateway.connections

    def responder(self, client, head, keep_alive):
        try:
            responder = self.gateway.responder(client, head, keep_alive)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        plan = getattr(responder, "plan", None)
        if plan is not None:
            try:
                _check_upstream_head(plan)
            except Crash as crash:
                self.errors.append(crash)
        return responder


# What a client may never put into the head the cluster gets (the gateway's own, or hop-by-hop).
_NEVER_FORWARDED = frozenset((b"proxy-authorization", b"proxy-connection", b"proxy", b"keep-alive", b"te",
                              b"trailer", b"expect"))


class _Fields:
    def __init__(self):
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name, value):
        self.fields.append((name.lower(), value))


def _check_upstream_head(plan) -> None:
    """The head planned for the cluster: one Host, the gateway's credential, the identity's (or
    the reviewed) impersonation, and nothing the client must not send on."""
    seen = _Fields()
    try:
        httptools.HttpRequestParser(seen).feed_data(plan.head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise Crash(f"the upstream head is not valid HTTP ({exc}): {plan.head[:300]!r}") from None
    values = {}
    for name, value in seen.fields:
        values.setdefault(name, []).append(value)
    if values.get(b"host") != [b"127.0.0.1:9"] or values.get(b"authorization") != [b"Bearer gateway-token"]:
        raise Crash(f"the upstream head's Host or Authorization is not the gateway's own: {plan.head[:300]!r}")
    impersonation = b"".join(name + b": " + value + b"\r\n" for name, value in seen.fields
                             if name.startswith(b"impersonate-"))
    expected = plan.identity.impersonation if plan.nested is None else plan.nested.headers()
    if impersonation.lower() != expected.lower():
        raise Crash(f"the upstream head impersonates what the gateway did not decide: {plan.head[:300]!r}")
    if _NEVER_FORWARDED & values.keys() or values.get(b"connection", [b"Upgrade"]) != [b"Upgrade"]:
        raise Crash(f"the upstream head carries a hop-by-hop or proxy-only header: {plan.head[:300]!r}")


class _Message:
    """Collects what an httptools parser reads: bodies and completed messages, in order."""

    def __init__(self):
        self.bodies: list[bytearray] = []
        self.complete = 0

    def on_message_begin(self):
        self.bodies.append(bytearray())

    def on_body(self, body):
        self.bodies[-1] += body

    def on_message_complete(self):
        self.complete += 1


class Harness:
    """One gateway (one cluster, one access key, a small body limit) shared by every input."""

    def __init__(self):
        folder = Path(tempfile.mkdtemp(prefix="fastproxy-fuzz-"))
        (folder / "token").write_text("gateway-token\n")
        (folder / "key").write_text(ACCESS_KEY + "\n")
        config = parse_config({
            "server": {"max_body_bytes": MAX_BODY_BYTES, "max_header_bytes": 8192},
            "clusters": [{"name": "one", "server": "http://127.0.0.1:9", "token_file": str(folder / "token")}],
            "access_keys": [{"name": "fuzz", "key_file": str(folder / "key"), "user": "alice", "groups": ["dev"]}],
        })
        self.errors: list = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.gateway = Gateway(config, self.loop)
        self.router = _WatchedRouter(self.gateway, self.errors)
        self.pool = self.gateway.clusters.get("one").pool

    def close(self) -> None:
        self.gateway.close()
        self.loop.close()

    # --- the targets -------------------------------------------------------------------------

    def request_stream(self, data: bytes) -> None:
        """Client bytes (request heads, bodies, pipelined requests) through the parser, the
        router and the cluster proxy's planning."""
        conn, client = self._connect()
        conn.data_received(data)
        self._settle()
        self._check_responses(client)
        conn.connection_lost(None)
        self._settle()
        self._check_errors(data)

    def response_head(self, data: bytes) -> None:
        """Upstream bytes (a response head, a body, whatever follows) through the upstream
        connection's parser and the relay to the client."""
        conn, client = self._connect()
        conn.data_received(RELAYED_REQUESTS[len(data) % len(RELAYED_REQUESTS)])
        upstream, _ = self._attach_upstream(conn)
        upstream.data_received(data)
        self._settle()
        upstream.connection_lost(None)  # the cluster closes: an unframed body ends here
        self._settle()
        self._check_responses(client)
        conn.connection_lost(None)
        self._check_errors(data)

    def chunked_body(self, data: bytes) -> None:
        """A chunked request body, fed in three pieces, through the gateway's re-framing: the
        cluster must receive exactly the body the gateway parsed, or less when it refused."""
        conn, client = self._connect()
        conn.data_received(CHUNKED_REQUEST)
        upstream, cluster = self._attach_upstream(conn)
        third = len(data) // 3
        for piece in (data[:third], data[third:2 * third], data[2 * third:]):
            if piece and not client.closed:
                conn.data_received(piece)
        self._settle()
        self._check_responses(client)
        sent, received = _Message(), _Message()
        try:
            httptools.HttpRequestParser(sent).feed_data(CHUNKED_REQUEST + data)
        except httptools.HttpParserError:
            pass  # the body up to the error is what the gateway parsed too
        _parse_all(httptools.HttpRequestParser(received), bytes(cluster.written), "the re-framed request")
        forwarded = bytes(received.bodies[0]) if received.bodies else b""
        parsed = bytes(sent.bodies[0]) if sent.bodies else b""
        if not parsed.startswith(forwarded):
            raise Crash(f"the cluster got body bytes the client never sent: {forwarded[:80]!r}")
        if received.complete and forwarded != parsed:
            raise Crash("the re-framed body ended early: the cluster read a complete, shorter body")
        if sent.complete and not cluster.closed and not received.complete:
            raise Crash("a complete chunked body was not forwarded complete")
        conn.connection_lost(None)
        self._settle()
        self._check_errors(data)

    # --- the pieces --------------------------------------------------------------------------

    def _connect(self) -> tuple[ClientConnection, FakeTransport]:
        conn, transport = ClientConnection(self.router), FakeTransport()
        conn.connection_made(transport)
        return conn, transport

    def _attach_upstream(self, conn: ClientConnection) -> tuple[UpstreamConnection, FakeTransport]:
        """Give the proxied request a connection to the cluster, as the pool's dial would."""
        self._settle()
        exchange = conn.active
        upstream, transport = UpstreamConnection(self.pool), FakeTransport()
        upstream.connection_made(transport)
        self.pool.open_count += 1
        exchange.upstream_ready(upstream)
        return upstream, transport

    def _settle(self) -> None:
        """Run what the input scheduled, less the pool's dials: no connection is opened, so the
        pool's count of open connections is set back."""
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.pool.open_count = 0

    def _check_responses(self, client: FakeTransport) -> None:
        _parse_all(httptools.HttpResponseParser(_Message()), bytes(client.written), "the response to the client")

    def _check_errors(self, data: bytes) -> None:
        if self.errors:
            errors, self.errors[:] = list(self.errors), []
            raise Crash(f"unexpected error on {data[:120]!r}: {errors!r}") from (
                errors[0] if isinstance(errors[0], BaseException) else errors[0].get("exception"))


def _parse_all(parser, data: bytes, what: str) -> None:
    """A stream cut short (the gateway aborted) parses as far as it goes; invalid bytes are a crash."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # a switched protocol: what follows is the tunnel's
    except httptools.HttpParserError as exc:
        raise Crash(f"{what} is not valid HTTP: {exc}: {data[:200]!r}") from None


TARGETS = {"request_stream": Harness.request_stream, "response_head": Harness.response_head,
           "chunked_body": Harness.chunked_body}
