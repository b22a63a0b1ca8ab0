"""The client connection's state machine driven through a fake transport, no processes: pipelining,
refusals, an in-process streaming handler with backpressure, disconnects, trailers, upgrades."""
from __future__ import annotations

import asyncio

import httptools
import pytest

from fastproxy.client import ClientConnection
from fastproxy.config import parse_config
from fastproxy.exchange import AWAITING_HEAD, IDLE
from fastproxy.gateway import Gateway
from fastproxy.local import LocalResponder
from fastproxy.routing import MANAGEMENT
from tests.fakes import FakeTransport


class Responses:
    """Parses what the connection wrote, one response after another."""

    def __init__(self, data: bytes):
        self.items: list[dict] = []
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(bytes(data))

    def on_message_begin(self):
        self.items.append({"headers": {}, "body": b"", "chunks": []})

    def on_header(self, name, value):
        self.items[-1]["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self):
        pass

    def on_body(self, body):
        self.items[-1]["body"] += body
        self.items[-1]["chunks"].append(body)

    def on_message_complete(self):
        self.items[-1]["complete"] = True


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, object, int]] = []

    def start(self, ctx):
        self.events.append(("start", ctx, ctx.status))  # the context itself: ids of freed ones recur

    def finish(self, ctx):
        self.events.append(("finish", ctx, ctx.status))


class StreamEvents(LocalResponder):
    """A watch served by the gateway itself: three JSON events, waiting whenever the client is full."""

    __slots__ = ()
    closed: list = []
    heads: list = []
    release: asyncio.Event | None = None

    def handle(self):
        StreamEvents.heads.append(list(self.ctx.head.headers))
        if self.ctx.route.path == "/once":
            self.send_json(200, {"kind": "Once", "body": len(b"".join(self.body))})
            return
        self.begin_stream()
        self.run(self.events())

    async def events(self):
        for n in range(3):
            await self.drain()
            self.send_chunk(b'{"type":"ADDED","n":%d}\n' % n)
            if n == 0 and StreamEvents.release is not None:
                await StreamEvents.release.wait()
        self.end_stream()

    def on_closed(self):
        StreamEvents.closed.append(self.ctx.route.path)


@pytest.fixture
def setup():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    config = parse_config({"server": {"header_timeout": 5}})
    recorder = Recorder()
    gateway = Gateway(config, loop, [recorder])
    gateway.handlers[MANAGEMENT] = StreamEvents
    StreamEvents.closed, StreamEvents.heads, StreamEvents.release = [], [], None

    def connect():
        conn = ClientConnection(gateway)
        transport = FakeTransport()
        conn.connection_made(transport)
        return conn, transport
    yield loop, connect, recorder
    gateway.close()
    loop.close()


def settle(loop, seconds=0.05):
    loop.run_until_complete(asyncio.sleep(seconds))


def on_loop(loop, fn, *args):
    """Call a protocol method from inside the event loop, as the transport does."""
    loop.call_soon(fn, *args)
    settle(loop)


def answers(loop, conn, transport, *pieces: bytes) -> list[dict]:
    """Feed the pieces to the connection one after another, then parse all it wrote."""
    for piece in pieces:
        on_loop(loop, conn.data_received, piece)
    return Responses(transport.written).items


def test_pipelined_requests_are_answered_in_order_with_a_refusal_between(setup):
    loop, connect, recorder = setup
    conn, transport = connect()
    got = answers(loop, conn, transport, b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n"
                       b"GET /nowhere HTTP/1.1\r\nHost: g\r\n\r\n"
                       b"GET /kubernetes/management/once HTTP/1.1\r\nHost: g\r\n\r\n")
    assert [a["body"][:2] for a in got] == [b"ok", b'{"', b'{"']
    assert '"code":404' in got[1]["body"].decode() and b'"Once"' in got[2]["body"]
    assert all(a["headers"].get("cache-control") == "no-store" and "date" in a["headers"] for a in got)
    finishes = [(ctx, status) for kind, ctx, status in recorder.events if kind == "finish"]
    assert [status for _, status in finishes] == [200, 404, 200]
    for ctx, _ in finishes:
        assert [kind for kind, c, _ in recorder.events if c is ctx] == ["start", "finish"]
    assert transport.reading and not transport.closed


def test_an_in_process_stream_waits_for_a_full_client_then_goes_on(setup):
    loop, connect, recorder = setup
    conn, transport = connect()
    StreamEvents.release = asyncio.Event()
    on_loop(loop, conn.data_received, b"GET /kubernetes/management/watch HTTP/1.1\r\nHost: g\r\n\r\n")
    assert Responses(transport.written).items[0]["chunks"] == [b'{"type":"ADDED","n":0}\n']
    conn.pause_writing()  # the client's buffer is full
    StreamEvents.release.set()
    settle(loop)
    assert len(Responses(transport.written).items[0]["chunks"]) == 1  # nothing more while paused
    conn.resume_writing()
    settle(loop)
    [answer] = Responses(transport.written).items
    assert answer["headers"]["transfer-encoding"] == "chunked" and answer.get("complete")
    assert len(answer["chunks"]) == 3
    assert [e[0] for e in recorder.events] == ["start", "finish"] and recorder.events[1][2] == 200


def test_a_client_that_leaves_mid_stream_is_finished_once_and_releases_the_handler(setup):
    loop, connect, recorder = setup
    conn, transport = connect()
    StreamEvents.release = asyncio.Event()
    on_loop(loop, conn.data_received, b"GET /kubernetes/management/watch HTTP/1.1\r\nHost: g\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")  # queued behind the stream
    conn.connection_lost(None)
    settle(loop)
    assert StreamEvents.closed == ["/watch"]
    finishes = [e for e in recorder.events if e[0] == "finish"]
    starts = [e for e in recorder.events if e[0] == "start"]
    assert len(starts) == 2 and len(finishes) == 2
    assert {id(e[1]) for e in finishes} == {id(e[1]) for e in starts}


def test_trailer_fields_do_not_become_the_next_requests_headers(setup):
    loop, connect, _ = setup
    conn, transport = connect()
    got = answers(loop, conn, transport, b"POST /kubernetes/management/once HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n0\r\nImpersonate-Group: system:masters\r\nAuthorization: Bearer x\r\n\r\n"
                       b"GET /kubernetes/management/once HTTP/1.1\r\nHost: g\r\n\r\n")
    assert [a["body"] for a in got] == [b'{"kind":"Once","body":3}', b'{"kind":"Once","body":0}']
    assert StreamEvents.heads == [[(b"Host", b"g"), (b"Transfer-Encoding", b"chunked")], [(b"Host", b"g")]]


def test_a_request_body_over_the_local_limit_is_413_and_closes(setup):
    loop, connect, _ = setup
    conn, transport = connect()
    big = LocalResponder.body_limit + 1
    conn.data_received(b"POST /kubernetes/management/once HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n" % big)
    [answer] = answers(loop, conn, transport, b"x" * big)
    assert '"code":413' in answer["body"].decode() and transport.closed


def test_an_upgrade_to_an_in_process_route_is_refused_and_ends_the_connection(setup):
    loop, connect, recorder = setup
    conn, transport = connect()
    [answer] = answers(loop, conn, transport, b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw bytes")
    assert answer["body"] == b"ok" and answer["headers"].get("connection") == "close" and transport.closed
    assert [e[0] for e in recorder.events] == ["start", "finish"]


def test_malformed_http_is_a_400_seen_by_observers(setup):
    loop, connect, recorder = setup
    conn, transport = connect()
    [answer] = answers(loop, conn, transport, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert '"code":400' in answer["body"].decode() and transport.closed
    assert [(e[0], e[2]) for e in recorder.events] == [("start", 0), ("finish", 400)]


@pytest.mark.parametrize("first", [
    b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
    # Refused while the client may hold back its body (Expect): the connection must end, and the
    # body bytes that do follow are never taken for a request.
    b"POST /nowhere HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nGET /",
])
def test_nothing_pipelined_after_a_closing_response_is_served_or_answered(setup, first):
    loop, connect, recorder = setup
    conn, transport = connect()
    got = answers(loop, conn, transport, first + b"GET /kubernetes/management/once HTTP/1.1\r\nHost: g\r\n\r\n")
    assert len(got) == 1 and got[0]["headers"]["connection"] == "close" and transport.closed
    assert StreamEvents.heads == [] and [e[0] for e in recorder.events] == ["start", "finish"]


def _get(path: bytes, big: int = 0) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * big + b"\r\n\r\n"


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at:at + size] for at in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1 << 20, 30000, 1000])
def test_a_head_over_the_limit_is_431_in_one_read_or_many(setup, size):
    loop, connect, _ = setup
    conn, transport = connect()
    [answer] = answers(loop, conn, transport, *_pieces(_get(b"/healthz", 70000), size))
    assert '"code":431' in answer["body"].decode() and transport.closed


@pytest.mark.parametrize("size", [30000, 1000])
def test_a_head_under_the_limit_split_across_reads_is_served(setup, size):
    loop, connect, _ = setup
    conn, transport = connect()
    [answer] = answers(loop, conn, transport, *_pieces(_get(b"/healthz", 60000), size))
    assert answer["body"][:2] == b"ok" and not transport.closed


def test_heads_under_the_limit_in_a_read_over_it_are_served(setup):
    loop, connect, _ = setup
    conn, transport = connect()
    got = answers(loop, conn, transport, _get(b"/healthz", 40000) + _get(b"/healthz", 40000))
    assert [a["body"][:2] for a in got] == [b"ok", b"ok"] and not transport.closed


def test_the_head_deadline_guards_only_a_head_left_unfinished(setup):
    loop, connect, _ = setup
    conn, transport = connect()
    answers(loop, conn, transport, _get(b"/healthz"))
    assert conn.deadline_kind == IDLE and conn.deadline > 0
    before = loop.time()
    answers(loop, conn, transport, b"GET /healthz HTTP/1.1\r\nHo")
    assert conn.deadline_kind == AWAITING_HEAD and conn.deadline >= before + 5
    answers(loop, conn, transport, b"st: g\r\n\r\n")
    assert conn.deadline_kind == IDLE
