"""The SPDY/3.1 codec and server session, over in-memory byte streams."""
from __future__ import annotations

import asyncio
import functools
import struct
import zlib

import pytest

from devcluster import spdy
from devcluster.spdy import (
    DataFrame,
    GoAway,
    Headers,
    Ping,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    WindowUpdate,
)

# The first bytes kubectl 1.32 (Go's compress/zlib) sent for one `kubectl port-forward`
# connection, captured from the devcluster: SYN_STREAM 1 (the error stream), its
# half-close, then SYN_STREAM 3, whose header block depends on the first one's.
KUBECTL_PORT_FORWARD_OPENING = bytes.fromhex(
    "800300010000003d0000000100000000000078f9e3c6a7c202253a703a2b294a4dcc851625aca9a080"
    "8614cb45a024cc6461c0c0c0c0590489c44c50e2663400000000ffff0000000101000000800300010000"
    "001800000003000000000000c2aa15540a2512d209000000ffff")

def run_async(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=10))
    return run


def test_dictionary_is_the_specifications():
    assert len(spdy.HEADER_DICTIONARY) == 1423
    assert spdy.HEADER_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.HEADER_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


ALL_FRAMES = [
    SynStream(1, {"streamtype": "error", "port": "80"}, flags=spdy.FLAG_FIN, priority=3),
    SynReply(1, {}),
    DataFrame(1, b"payload"),
    DataFrame(3, b"", fin=True),
    RstStream(5, spdy.CANCEL),
    Settings({7: 65536, 4: 100}),
    Ping(7),
    GoAway(9, spdy.GOAWAY_PROTOCOL_ERROR),
    Headers(1, {"x-extra": "a\x00b"}, flags=spdy.FLAG_FIN),
    WindowUpdate(0, 32768),
]


def test_every_frame_type_round_trips():
    sender, receiver = spdy.FrameCodec(), spdy.FrameCodec()
    wire = b"".join(sender.encode(frame) for frame in ALL_FRAMES)
    assert receiver.feed(wire) == ALL_FRAMES  # several frames in one read


def test_frames_split_across_reads_are_reassembled():
    sender, receiver = spdy.FrameCodec(), spdy.FrameCodec()
    wire = b"".join(sender.encode(frame) for frame in ALL_FRAMES)
    parsed = []
    for start in range(0, len(wire), 3):
        parsed += receiver.feed(wire[start:start + 3])
    assert parsed == ALL_FRAMES


def test_wire_layout_of_data_and_control_frames():
    codec = spdy.FrameCodec()
    assert codec.encode(DataFrame(5, b"hi", fin=True)) == bytes.fromhex("00000005 01000002") + b"hi"
    assert codec.encode(Ping(3)) == bytes.fromhex("80030006 00000004 00000003")
    assert codec.encode(RstStream(1, spdy.CANCEL)) == bytes.fromhex("80030003 00000008 00000001 00000005")


def test_header_blocks_share_one_compression_context_per_direction():
    sender, receiver = spdy.FrameCodec(), spdy.FrameCodec()
    headers = {"streamtype": "stdout", "requestid": "0"}
    first, second = sender.encode(SynStream(1, headers)), sender.encode(SynStream(3, headers))
    assert len(second) < len(first)  # the repeat is a back-reference into the shared window
    assert receiver.feed(first + second) == [SynStream(1, headers), SynStream(3, headers)]
    with pytest.raises(spdy.ProtocolError):
        spdy.FrameCodec().feed(second)  # meaningless without the first block's context


def test_decodes_header_blocks_compressed_by_kubectl():
    assert spdy.FrameCodec().feed(KUBECTL_PORT_FORWARD_OPENING) == [
        SynStream(1, {"streamtype": "error", "port": "80", "requestid": "0"}),
        DataFrame(1, b"", fin=True),
        SynStream(3, {"streamtype": "data", "port": "80", "requestid": "0"}),
    ]


def test_header_names_are_sent_lowercase():
    block = spdy.FrameCodec().encode(SynReply(1, {"StreamType": "data"}))[12:]
    assert b"streamtype" in zlib.decompressobj(zdict=spdy.HEADER_DICTIONARY).decompress(block)


def test_unknown_control_frames_are_skipped_and_other_versions_refused():
    codec = spdy.FrameCodec()
    unknown = struct.pack(">HHI", 0x8003, 0x00FF, 2) + b"??"
    assert codec.feed(unknown + codec.encode(Ping(1))) == [Ping(1)]
    with pytest.raises(spdy.ProtocolError):
        codec.feed(struct.pack(">HHII", 0x8002, spdy.PING, 4, 1))


class Client:
    """The client end of a session over an in-memory transport."""

    def __init__(self):
        self.codec = spdy.FrameCodec()
        self.to_server: asyncio.Queue[bytes] = asyncio.Queue()
        self.from_server: asyncio.Queue[bytes] = asyncio.Queue()
        self.received: list = []

    async def server_read(self) -> bytes:
        return await self.to_server.get()

    async def server_write(self, data: bytes) -> None:
        self.from_server.put_nowait(data)

    def send(self, *frames) -> None:
        self.to_server.put_nowait(b"".join(self.codec.encode(frame) for frame in frames))

    def hang_up(self) -> None:
        self.to_server.put_nowait(b"")

    async def receive(self, count: int) -> list:
        while len(self.received) < count:
            self.received += self.codec.feed(await self.from_server.get())
        frames, self.received = self.received[:count], self.received[count:]
        return frames

    async def open(self, session: spdy.Session, stream_id: int, **headers: str) -> spdy.Stream:
        self.send(SynStream(stream_id, headers))
        assert await self.receive(1) == [SynReply(stream_id, {})]
        return await session.accept()


@run_async
async def test_streams_carry_data_both_ways_with_half_close():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1, streamtype="stdin")
        assert (stream.id, stream.headers) == (1, {"streamtype": "stdin"})
        client.send(DataFrame(1, b"hello "), DataFrame(1, b"world", fin=True))
        assert [await stream.read(), await stream.read(), await stream.read()] == [b"hello ", b"world", b""]
        assert await stream.read() == b""
        await stream.write(b"reply")
        await stream.close()
        assert await client.receive(2) == [DataFrame(1, b"reply"), DataFrame(1, b"", fin=True)]
        with pytest.raises(RuntimeError):
            await stream.write(b"after close")


@run_async
async def test_large_writes_are_cut_into_frames():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1)
        await stream.write(bytes(spdy.MAX_DATA_FRAME * 2 + 1))
        frames = await client.receive(3)
        assert [len(frame.data) for frame in frames] == [spdy.MAX_DATA_FRAME, spdy.MAX_DATA_FRAME, 1]


@run_async
async def test_consumed_data_returns_window_credit():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1)
        client.send(DataFrame(1, bytes(spdy.WINDOW_UPDATE_THRESHOLD - 1)), DataFrame(1, b"xy"))
        await stream.read()
        assert client.from_server.empty()
        await stream.read()
        assert await client.receive(2) == [WindowUpdate(1, spdy.WINDOW_UPDATE_THRESHOLD + 1),
                                           WindowUpdate(0, spdy.WINDOW_UPDATE_THRESHOLD + 1)]


@run_async
async def test_pings_from_the_client_are_echoed():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write):
        client.send(Ping(1), Ping(2), Ping(3))
        assert await client.receive(2) == [Ping(1), Ping(3)]


@run_async
async def test_reset_streams_end_input_and_drop_output():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1)
        client.send(RstStream(1, spdy.CANCEL), Ping(1))
        assert await client.receive(1) == [Ping(1)]
        assert await stream.read() == b""
        await stream.write(b"dropped")
        await stream.close()
        client.send(Ping(3))
        assert await client.receive(1) == [Ping(3)]


@run_async
async def test_invalid_stream_ids_are_refused():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        await client.open(session, 3)
        client.send(SynStream(2, {}), SynStream(1, {}), DataFrame(9, b"?"), DataFrame(3, b"ok"))
        assert await client.receive(3) == [RstStream(2, spdy.PROTOCOL_ERROR),
                                           RstStream(1, spdy.PROTOCOL_ERROR),
                                           RstStream(9, spdy.INVALID_STREAM)]


@run_async
async def test_unidirectional_and_finished_syn_streams():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        client.send(SynStream(1, {}, flags=spdy.FLAG_FIN | spdy.FLAG_UNIDIRECTIONAL), Ping(1))
        assert await client.receive(1) == [Ping(1)]  # no reply for a unidirectional stream
        stream = await session.accept()
        assert await stream.read() == b""


@run_async
async def test_headers_frames_add_headers_and_may_end_input():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1, streamtype="data")
        client.send(Headers(1, {"late": "yes"}, flags=spdy.FLAG_FIN))
        assert await stream.read() == b""
        assert stream.headers == {"streamtype": "data", "late": "yes"}


@run_async
async def test_go_away_reports_the_last_stream_and_refuses_new_ones():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        await client.open(session, 1)
        await session.go_away()
        client.send(SynStream(3, {}))
        assert await client.receive(2) == [GoAway(1, spdy.GOAWAY_OK), RstStream(3, spdy.REFUSED_STREAM)]


@run_async
async def test_protocol_errors_end_the_session_with_go_away():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        client.to_server.put_nowait(struct.pack(">HHII", 0x8002, spdy.PING, 4, 1))
        assert await client.receive(1) == [GoAway(0, spdy.GOAWAY_PROTOCOL_ERROR)]
        assert await session.accept() is None


@run_async
async def test_end_of_transport_closes_the_session_and_its_streams():
    client = Client()
    async with spdy.Session(client.server_read, client.server_write) as session:
        stream = await client.open(session, 1)
        client.hang_up()
        assert await session.wait_closed(timeout=5)
        assert await stream.read() == b""
        assert await session.accept() is None
        await stream.write(b"nobody listens")
    assert client.from_server.empty()
