"""The upstream TLS transport against a real TLS server (uvloop's own TLS, an independent implementation)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading

import pytest
import uvloop

from fastproxy.tlssocket import READ_BUDGET, open_tls_connection


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


def test_close_sends_everything_buffered_first(tls_files):
    payload = os.urandom(4 * 1024 * 1024)
    received = []

    def serve(conn):
        chunks = []
        while data := conn.recv(65536):  # until the client's close_notify
            chunks.append(data)
        received.append(b"".join(chunks))

    async def scenario(port):
        client = await connect(port, tls_files)
        client.transport.write(payload)
        client.transport.close()
        assert client.transport.is_closing()
        client.transport.write(b"after close")  # dropped, as asyncio transports do
        assert await asyncio.wait_for(client.lost, 10) is None
    with blocking_server(tls_files, serve) as port:
        run(tls_files, echo, lambda _: scenario(port))
    assert len(received[0]) == len(payload)
    assert received == [payload]


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


def test_a_certificate_for_another_name_is_refused(tls_files):
    async def scenario(port):
        loop = asyncio.get_running_loop()
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_tls_connection(loop, Recorder, "127.0.0.1", port, client_context(tls_files), "api.example.com")
    run(tls_files, echo, scenario)
