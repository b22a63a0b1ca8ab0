"""The TLS socket transport against real peers: as a client, uvloop's own TLS server (an independent
implementation); as a server (TLSListener), clients on blocking ssl sockets in a thread."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import ssl
import threading
import time

import pytest
import uvloop

from fastproxy.accepting import ACCEPT_PAUSE
from fastproxy.tlssocket import READ_BUDGET, TLSListener, open_tls_connection
from fastproxy.upstream import ResumingContext


class Recorder(asyncio.Protocol):
    """Keeps what the transport tells its protocol."""

    def __init__(self):
        self.data = bytearray()
        self.events: list[str] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(256 * 1024, 64 * 1024)

    def data_received(self, data):
        self.data += data
        self.arrived.set()

    def eof_received(self):
        self.events.append("eof")
        return False

    def pause_writing(self):
        self.events.append("pause_writing")

    def resume_writing(self):
        self.events.append("resume_writing")

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)

    async def wait_for_bytes(self, count: int, timeout: float = 10) -> None:
        async def enough():
            while len(self.data) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), timeout)


def client_context(tls_files) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    context.set_alpn_protocols(["http/1.1"])
    return context


def run(tls_files, serve, scenario):
    """Start a TLS server whose connections run `serve(reader, writer)`, then `scenario(port)`."""
    async def main():
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(str(tls_files["cert"]), str(tls_files["key"]))
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        try:
            return await scenario(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def connect(port: int, tls_files, session=None, context=None) -> Recorder:
    loop = asyncio.get_running_loop()
    protocol = None

    def factory():
        nonlocal protocol
        protocol = Recorder()
        return protocol
    context = context or client_context(tls_files)
    await open_tls_connection(loop, factory, "127.0.0.1", port, context, "127.0.0.1", session)
    return protocol


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_megabytes_both_ways_with_write_backpressure(tls_files):
    payload = os.urandom(6 * 1024 * 1024)

    async def scenario(port):
        client = await connect(port, tls_files)
        client.transport.write(payload)  # far more than the socket takes at once
        assert "pause_writing" in client.events
        await client.wait_for_bytes(len(payload))
        assert bytes(client.data) == payload
        assert client.events[:2] == ["pause_writing", "resume_writing"]
        assert client.transport.get_write_buffer_size() == 0
        client.transport.close()
        assert await client.lost is None
    run(tls_files, echo, scenario)


def test_a_burst_larger_than_one_read_budget_arrives_whole(tls_files):
    payload = os.urandom(3 * READ_BUDGET + 12345)

    async def serve(reader, writer):
        writer.write(payload)
        await writer.drain()
        await reader.read()  # keeps the connection open until the client closes

    async def scenario(port):
        client = await connect(port, tls_files)
        await client.wait_for_bytes(len(payload))
        assert bytes(client.data) == payload
        client.transport.abort()
        assert await client.lost is None
    run(tls_files, serve, scenario)


def test_paused_reading_delivers_nothing_until_resumed(tls_files):
    async def serve(reader, writer):
        for _ in range(200):
            writer.write(b"x" * 8192)
            await writer.drain()
            await asyncio.sleep(0.002)
        await reader.read()

    async def scenario(port):
        client = await connect(port, tls_files)
        await client.wait_for_bytes(1)
        client.transport.pause_reading()
        assert not client.transport.is_reading()
        seen = len(client.data)
        await asyncio.sleep(0.3)  # the server keeps sending meanwhile
        assert len(client.data) == seen
        client.transport.resume_reading()
        await client.wait_for_bytes(200 * 8192)
        assert len(client.data) == 200 * 8192
        client.transport.abort()
    run(tls_files, serve, scenario)


def test_peer_close_is_an_eof_then_a_clean_loss(tls_files):
    async def serve(reader, writer):
        writer.write(b"last words")
        await writer.drain()
        writer.close()

    async def scenario(port):
        client = await connect(port, tls_files)
        assert await asyncio.wait_for(client.lost, 5) is None
        assert bytes(client.data) == b"last words"
        assert client.events == ["eof", "lost"]
    run(tls_files, serve, scenario)


def test_a_burst_of_short_records_then_the_peers_close_arrives_in_order(tls_files):
    # One record per write, as a watch's events come: each read takes one, and the socket's
    # readiness must bring the next ones, then the close behind them.
    records = [b"event %04d\n" % number for number in range(500)]

    async def serve(reader, writer):
        for record in records:
            writer.write(record)
        await writer.drain()
        writer.close()

    async def scenario(port):
        client = await connect(port, tls_files)
        assert await asyncio.wait_for(client.lost, 10) is None
        assert bytes(client.data) == b"".join(records)
        assert client.events == ["eof", "lost"]
    run(tls_files, serve, scenario)


def test_close_sends_everything_buffered_first_and_does_not_wait_for_the_peer(tls_files):
    payload = os.urandom(4 * 1024 * 1024)
    received = []
    moments = {}

    def serve(conn):
        chunks = []
        while data := conn.recv(65536):  # until the client's close_notify
            chunks.append(data)
        received.append(b"".join(chunks))
        time.sleep(1.0)  # a peer slow to close its side
        moments["peer_closed"] = time.monotonic()

    async def scenario(port):
        client = await connect(port, tls_files)
        client.transport.write(payload)
        client.transport.close()
        assert client.transport.is_closing()
        client.transport.write(b"after close")  # dropped, as asyncio transports do
        assert await asyncio.wait_for(client.lost, 10) is None
        moments["lost"] = time.monotonic()
    with blocking_server(tls_files, serve) as port:
        run(tls_files, echo, lambda _: scenario(port))
    assert len(received[0]) == len(payload)
    assert received == [payload]
    assert moments["lost"] < moments["peer_closed"]  # the protocol was not kept waiting


@contextlib.contextmanager
def blocking_server(tls_files, serve):
    """One connection served by a thread on blocking sockets: reads exactly as the peer sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls_files["cert"]), str(tls_files["key"]))
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as conn:
            serve(conn)

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()


def test_a_second_connection_resumes_the_first_ones_session(tls_files):
    async def serve(reader, writer):
        writer.write(b"hello")
        await writer.drain()
        await reader.read()

    async def scenario(port):
        context = client_context(tls_files)
        first = await connect(port, tls_files, context=context)
        await first.wait_for_bytes(5)  # TLS 1.3 tickets come after the handshake, before the data
        session = first.transport.get_extra_info("ssl_object").session
        second = await connect(port, tls_files, session, context)
        assert second.transport.get_extra_info("ssl_object").session_reused
        assert not first.transport.get_extra_info("ssl_object").session_reused
        for client in (first, second):
            client.transport.abort()
    run(tls_files, serve, scenario)


def test_the_pools_context_learns_sessions_from_full_handshakes_only(tls_files):
    """A resumed connection leaves the session it offered in place: each read of
    SSLSocket.session leaks a copy in CPython 3.11 (gh-116810), so reads stay rare."""
    async def serve(reader, writer):
        writer.write(b"hello")
        await writer.drain()
        await reader.read()

    async def scenario(port):
        context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(tls_files["ca"]))
        clients = []
        for offered in (None, "learnt", None):
            client = await connect(port, tls_files, context.latest_session if offered else None, context)
            await client.wait_for_bytes(5)  # the TLS 1.3 ticket has come
            clients.append(client)
            resumed = client.transport.get_extra_info("ssl_object").session_reused
            before = context.latest_session
            context.learn_session(client.transport)
            assert resumed == bool(offered)
            assert (context.latest_session is before) == resumed, offered
            assert context.latest_session is not None
        for client in clients:
            client.transport.abort()
    run(tls_files, serve, scenario)


def test_a_certificate_for_another_name_is_refused(tls_files):
    async def scenario(port):
        loop = asyncio.get_running_loop()
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_tls_connection(loop, Recorder, "127.0.0.1", port, client_context(tls_files), "api.example.com")
    run(tls_files, echo, scenario)


def server_context(tls_files) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls_files["cert"]), str(tls_files["key"]))
    return context


def listen(tls_files, scenario, handshake_timeout=10.0, plain_http_answer=b""):
    """Run `scenario(port, accepted, listener)` against a TLSListener; `accepted` holds a Recorder per connection."""
    async def main():
        accepted: list[Recorder] = []

        def factory():
            accepted.append(Recorder())
            return accepted[-1]
        sock = socket.create_server(("127.0.0.1", 0))
        listener = TLSListener(asyncio.get_running_loop(), sock, server_context(tls_files), factory, handshake_timeout,
                               plain_http_answer)
        try:
            return await scenario(sock.getsockname()[1], accepted, listener)
        finally:
            listener.close()
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def blocking_client(tls_files, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ssl.create_default_context(cafile=str(tls_files["ca"])).wrap_socket(raw, server_hostname="127.0.0.1")


async def in_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def test_listener_serves_a_client_both_ways(tls_files):
    payload = os.urandom(3 * 1024 * 1024)

    def client(port):
        with blocking_client(tls_files, port) as conn:
            conn.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += conn.recv(65536)
            return bytes(got)

    async def scenario(port, accepted, listener):
        echoed = asyncio.ensure_future(in_thread(client, port))
        while not accepted:
            await asyncio.sleep(0.01)
        server = accepted[0]
        assert server.transport.get_extra_info("sslcontext") is not None
        assert server.transport.get_extra_info("peername")[0] == "127.0.0.1"
        await server.wait_for_bytes(len(payload))
        server.transport.write(bytes(server.data))
        assert await asyncio.wait_for(echoed, 10) == payload
    listen(tls_files, scenario)


def test_a_client_that_sends_then_closes_its_side_loses_nothing(tls_files):
    payload = os.urandom(4 * 1024 * 1024)

    def client(port):
        conn = blocking_client(tls_files, port)
        conn.sendall(payload)
        raw = conn.unwrap()  # close_notify while most of the payload is still in flight
        raw.shutdown(socket.SHUT_WR)
        ended = raw.recv(65536)  # what is left once the server closes
        raw.close()
        return ended

    async def scenario(port, accepted, listener):
        assert await in_thread(client, port) == b""
        while not accepted:
            await asyncio.sleep(0.01)
        server = accepted[0]
        assert await asyncio.wait_for(server.lost, 10) is None
        assert len(server.data) == len(payload)
        assert bytes(server.data) == payload
        assert server.events == ["eof", "lost"]
    listen(tls_files, scenario)


def test_a_stalled_handshake_is_dropped_and_plain_http_is_answered_in_the_clear(tls_files):
    def silent(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            return raw.recv(1)  # b"" once the listener gives up on the handshake

    def plain_http(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while data := raw.recv(65536):
                got += data
            return got

    def greeting(port):
        with blocking_client(tls_files, port) as conn:
            return conn.recv(100)

    async def scenario(port, accepted, listener):
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await asyncio.wait_for(in_thread(silent, port), 5) == b""
        assert 0.4 <= loop.time() - began < 3
        assert await asyncio.wait_for(in_thread(plain_http, port), 5) == b"HTTP/1.1 400 use TLS\r\n\r\n"
        assert accepted == []  # neither reached the protocol
        served = asyncio.ensure_future(in_thread(greeting, port))
        while not accepted:
            await asyncio.sleep(0.01)
        accepted[0].transport.write(b"still serving")
        assert await asyncio.wait_for(served, 5) == b"still serving"
    listen(tls_files, scenario, handshake_timeout=0.5, plain_http_answer=b"HTTP/1.1 400 use TLS\r\n\r\n")


def test_a_closed_listener_refuses_new_clients_and_keeps_established_ones(tls_files):
    def refused(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    async def scenario(port, accepted, listener):
        conn = await in_thread(blocking_client, tls_files, port)
        try:
            while not accepted:
                await asyncio.sleep(0.01)
            listener.close()
            assert await in_thread(refused, port)
            await in_thread(conn.sendall, b"after close")
            await accepted[0].wait_for_bytes(len(b"after close"))
            assert bytes(accepted[0].data) == b"after close"
        finally:
            conn.close()
    listen(tls_files, scenario)


def test_out_of_file_descriptors_pauses_accepting_then_serves_the_waiting_client(tls_files, caplog):
    def handshake_and_send(raw):
        with ssl.create_default_context(cafile=str(tls_files["ca"])).wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"waited")
            return conn.recv(2)

    async def scenario(port, accepted, listener):
        loop = asyncio.get_running_loop()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued in the backlog
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor left to accept with
        try:
            began = loop.time()
            while "cannot accept clients" not in caplog.text:
                assert loop.time() - began < 5, "accept never failed"
                await asyncio.sleep(0.01)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        served = asyncio.ensure_future(in_thread(handshake_and_send, raw))
        while not accepted:
            await asyncio.sleep(0.01)
        assert loop.time() - began >= ACCEPT_PAUSE * 0.9  # accepting rested instead of spinning
        await accepted[0].wait_for_bytes(6)
        accepted[0].transport.write(b"ok")
        assert await asyncio.wait_for(served, 10) == b"ok"
    with caplog.at_level(logging.ERROR, logger="fastproxy"):
        listen(tls_files, scenario)
