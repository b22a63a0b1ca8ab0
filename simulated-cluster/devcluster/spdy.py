"""Server side of SPDY/3.1, as kubectl uses it for exec, attach and port-forward.

Only what those clients need: the frame codec with zlib-compressed name/value
header blocks, and a session that accepts the streams the client opens. The
session runs over any byte transport given as two coroutines: ``read()``,
returning b"" once input has ended, and ``write(data)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

# Payloads are cut into DATA frames of at most this size.
MAX_DATA_FRAME = 32 * 1024
# Receive window credit is returned once this much has been consumed
# (half of SPDY/3.1's default 64 KiB window).
WINDOW_UPDATE_THRESHOLD = 32 * 1024

# The SPDY/3 header compression dictionary (a constant of the specification):
# length-prefixed common header names and values, then a run of plain text.
_DICTIONARY_ENTRIES = (
    "options", "head", "post", "put", "delete", "trace", "accept",
    "accept-charset", "accept-encoding", "accept-language", "accept-ranges",
    "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length",
    "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "location", "max-forwards", "pragma",
    "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method",
    "get", "status", "200 OK", "version", "HTTP/1.1", "url", "public",
    "set-cookie", "keep-alive", "origin",
)
_DICTIONARY_TEXT = (
    "100101201202205206300302303304305306307402405406407408409410411412413414"
    "415416417502504505203 Non-Authoritative Information204 No Content"
    "301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden"
    "404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec"
    " 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,"
    "image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,"
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = b"".join(
    struct.pack(">I", len(entry)) + entry.encode() for entry in _DICTIONARY_ENTRIES
) + _DICTIONARY_TEXT.encode()


class ProtocolError(Exception):
    """The peer sent bytes that are not valid SPDY/3.1."""


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: dict[str, str]
    flags: int = 0
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: dict[str, str]
    flags: int = 0


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    values: dict[int, int]  # setting id -> value; per-entry flags are not kept


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class Headers:
    stream_id: int
    headers: dict[str, str]
    flags: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0 for the session's own window
    delta: int


Frame = (
    DataFrame | SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers | WindowUpdate
)


class FrameCodec:
    """Serialises and parses the frames of one end of a session.

    Header blocks share one zlib context per direction for the whole session,
    so frames must be encoded in the order they are sent and fed in the order
    they arrive.
    """

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zdict=HEADER_DICTIONARY)
        self._decompressor = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self._buffer = bytearray()

    def encode(self, frame: Frame) -> bytes:
        match frame:
            case DataFrame(stream_id, data, fin):
                return struct.pack(">II", stream_id, (fin << 24) | len(data)) + data
            case SynStream(stream_id, headers, flags, associated_id, priority):
                body = struct.pack(">IIBB", stream_id, associated_id, priority << 5, 0)
                return _control(SYN_STREAM, flags, body + self._compress(headers))
            case SynReply(stream_id, headers, flags):
                return _control(SYN_REPLY, flags, struct.pack(">I", stream_id) + self._compress(headers))
            case RstStream(stream_id, status):
                return _control(RST_STREAM, 0, struct.pack(">II", stream_id, status))
            case Settings(values):
                entries = b"".join(struct.pack(">II", key, value) for key, value in values.items())
                return _control(SETTINGS, 0, struct.pack(">I", len(values)) + entries)
            case Ping(ping_id):
                return _control(PING, 0, struct.pack(">I", ping_id))
            case GoAway(last_good_stream_id, status):
                return _control(GOAWAY, 0, struct.pack(">II", last_good_stream_id, status))
            case Headers(stream_id, headers, flags):
                return _control(HEADERS, flags, struct.pack(">I", stream_id) + self._compress(headers))
            case WindowUpdate(stream_id, delta):
                return _control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))
        raise TypeError(f"not a SPDY frame: {frame!r}")

    def feed(self, data: bytes) -> list[Frame]:
        """Buffers ``data`` and returns every frame now complete.

        Control frames of unknown types are skipped, as the specification asks.
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= 8:
            first, second = struct.unpack_from(">II", self._buffer)
            end = 8 + (second & 0xFFFFFF)
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[8:end])
            del self._buffer[:end]
            flags = second >> 24
            if not first & 0x80000000:
                frames.append(DataFrame(first, payload, bool(flags & FLAG_FIN)))
                continue
            if (first >> 16) & 0x7FFF != VERSION:
                raise ProtocolError(f"unsupported SPDY version {(first >> 16) & 0x7FFF}")
            try:
                frame = self._parse_control(first & 0xFFFF, flags, payload)
            except (struct.error, zlib.error, UnicodeDecodeError) as error:
                raise ProtocolError(f"malformed control frame: {error}") from error
            if frame is not None:
                frames.append(frame)
        return frames

    def _parse_control(self, frame_type: int, flags: int, payload: bytes) -> Frame | None:
        match frame_type:
            case 1:  # SYN_STREAM
                stream_id, associated_id, priority = struct.unpack_from(">IIB", payload)
                headers = self._decompress(payload[10:])
                return SynStream(stream_id & 0x7FFFFFFF, headers, flags,
                                 associated_id & 0x7FFFFFFF, priority >> 5)
            case 2:  # SYN_REPLY
                return SynReply(_stream_id(payload), self._decompress(payload[4:]), flags)
            case 3:  # RST_STREAM
                stream_id, status = struct.unpack_from(">II", payload)
                return RstStream(stream_id & 0x7FFFFFFF, status)
            case 4:  # SETTINGS
                (count,) = struct.unpack_from(">I", payload)
                entries = (struct.unpack_from(">II", payload, 4 + 8 * i) for i in range(count))
                return Settings({key & 0xFFFFFF: value for key, value in entries})
            case 6:  # PING
                return Ping(struct.unpack_from(">I", payload)[0])
            case 7:  # GOAWAY
                last_good, status = struct.unpack_from(">II", payload)
                return GoAway(last_good & 0x7FFFFFFF, status)
            case 8:  # HEADERS
                return Headers(_stream_id(payload), self._decompress(payload[4:]), flags)
            case 9:  # WINDOW_UPDATE
                stream_id, delta = struct.unpack_from(">II", payload)
                return WindowUpdate(stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        return None

    def _compress(self, headers: Mapping[str, str]) -> bytes:
        block = bytearray(struct.pack(">I", len(headers)))
        for name, value in headers.items():
            for text in (name.lower(), value):
                encoded = text.encode()
                block += struct.pack(">I", len(encoded)) + encoded
        # A sync flush ends every block on a byte boundary, so the peer can
        # decode it completely without waiting for later frames.
        return self._compressor.compress(bytes(block)) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def _decompress(self, compressed: bytes) -> dict[str, str]:
        block = self._decompressor.decompress(compressed)
        (count,) = struct.unpack_from(">I", block)
        headers, offset = {}, 4
        for _ in range(count):
            name, offset = _read_string(block, offset)
            value, offset = _read_string(block, offset)
            # Several values of one name arrive NUL-separated; kept as sent.
            headers[name.lower()] = value
        return headers


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def _stream_id(payload: bytes) -> int:
    return struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF


def _read_string(block: bytes, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">I", block, offset)
    end = offset + 4 + length
    if end > len(block):
        raise struct.error("header block truncated")
    return block[offset + 4:end].decode(), end


@dataclass(eq=False)
class Stream:
    """One stream the peer opened; each direction closes on its own."""

    session: Session
    id: int
    headers: dict[str, str]
    _inbound: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    _remote_open: bool = True
    _local_open: bool = True
    _aborted: bool = False
    _unacknowledged: int = 0

    async def read(self) -> bytes:
        """Returns the next chunk the peer sent, or b"" once it has finished."""
        chunk = await self._inbound.get()
        if chunk:
            await self.session._consumed(self, len(chunk))
        else:
            self._inbound.put_nowait(b"")  # later reads see the end as well
        return chunk

    async def write(self, data: bytes) -> None:
        """Sends ``data``; dropped once the stream was reset or the session ended."""
        if self._aborted:
            return
        if not self._local_open:
            raise RuntimeError(f"stream {self.id} is already closed for writing")
        for start in range(0, len(data), MAX_DATA_FRAME):
            await self.session._send(DataFrame(self.id, data[start:start + MAX_DATA_FRAME]))

    async def close(self) -> None:
        """Half-closes the stream: the peer reads the end after what was written."""
        if self._local_open and not self._aborted:
            self._local_open = False
            await self.session._send(DataFrame(self.id, b"", fin=True))
            self.session._forget_if_done(self)

    async def reset(self, status: int = CANCEL) -> None:
        if not self._aborted:
            self._abort()
            await self.session._send(RstStream(self.id, status))

    def _end_input(self) -> None:
        if self._remote_open:
            self._remote_open = False
            self._inbound.put_nowait(b"")

    def _abort(self) -> None:
        self._aborted = True
        self._end_input()
        self._local_open = False
        self.session._streams.pop(self.id, None)


class Session:
    """The server end of one SPDY/3.1 connection.

    Use as ``async with Session(read, write) as session``: incoming frames are
    processed in the background until the transport ends, and the streams the
    client opens are handed out by ``accept()``.

    Flow control: the receive windows are replenished as ``Stream.read()``
    consumes data, but the peer's windows are not enforced on what we send,
    because kubectl's SPDY library never sends WINDOW_UPDATE and would stall
    after its first 64 KiB.
    """

    def __init__(self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]):
        self._read = read
        self._write = write
        self._codec = FrameCodec()
        self._send_lock = asyncio.Lock()
        self._streams: dict[int, Stream] = {}
        self._opened: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._last_peer_stream_id = 0
        self._going_away = False
        self._unacknowledged = 0
        self.closed = asyncio.Event()
        self._receiver: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        self._receiver = asyncio.create_task(self._receive())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._receiver is not None
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        self._shut_down()

    async def accept(self) -> Stream | None:
        """Returns the next stream the peer opened, or None once the session ended."""
        stream = await self._opened.get()
        if stream is None:
            self._opened.put_nowait(None)
        return stream

    async def go_away(self, status: int = GOAWAY_OK) -> None:
        """Tells the peer no further streams will be accepted."""
        if not self._going_away:
            self._going_away = True
            await self._send(GoAway(self._last_peer_stream_id, status))

    async def wait_closed(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the peer to end the connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        return self.closed.is_set()

    async def _receive(self) -> None:
        try:
            while data := await self._read():
                for frame in self._codec.feed(data):
                    await self._handle(frame)
        except ProtocolError:
            await self.go_away(GOAWAY_PROTOCOL_ERROR)
        except ConnectionError:
            pass
        finally:
            self._shut_down()

    async def _handle(self, frame: Frame) -> None:
        match frame:
            case DataFrame(stream_id, data, fin):
                stream = self._streams.get(stream_id)
                if stream is None or not stream._remote_open:
                    if stream_id > self._last_peer_stream_id:  # never opened
                        await self._send(RstStream(stream_id, INVALID_STREAM))
                    return
                if data:
                    stream._inbound.put_nowait(data)
                if fin:
                    stream._end_input()
                    self._forget_if_done(stream)
            case SynStream(stream_id, headers, flags):
                await self._open(stream_id, headers, flags)
            case Headers(stream_id, headers, flags) if stream_id in self._streams:
                stream = self._streams[stream_id]
                stream.headers.update(headers)
                if flags & FLAG_FIN:
                    stream._end_input()
                    self._forget_if_done(stream)
            case RstStream(stream_id) if stream_id in self._streams:
                self._streams[stream_id]._abort()
            case Ping(ping_id) if ping_id % 2 == 1:  # client pings are odd; we send none
                await self._send(frame)
            case GoAway():
                self._going_away = True
            # SETTINGS and WINDOW_UPDATE only concern sending windows, which are
            # not enforced (see the class docstring).

    async def _open(self, stream_id: int, headers: dict[str, str], flags: int) -> None:
        if stream_id % 2 == 0 or stream_id <= self._last_peer_stream_id:
            await self._send(RstStream(stream_id, PROTOCOL_ERROR))
            return
        self._last_peer_stream_id = stream_id
        if self._going_away:
            await self._send(RstStream(stream_id, REFUSED_STREAM))
            return
        stream = Stream(self, stream_id, headers)
        self._streams[stream_id] = stream
        if flags & FLAG_UNIDIRECTIONAL:
            stream._local_open = False
        else:
            # Clients wait for this reply before they use the stream.
            await self._send(SynReply(stream_id, {}))
        if flags & FLAG_FIN:
            stream._end_input()
            self._forget_if_done(stream)
        self._opened.put_nowait(stream)

    async def _consumed(self, stream: Stream, size: int) -> None:
        stream._unacknowledged += size
        self._unacknowledged += size
        updates = []
        if stream._unacknowledged >= WINDOW_UPDATE_THRESHOLD and stream._remote_open:
            updates.append(WindowUpdate(stream.id, stream._unacknowledged))
            stream._unacknowledged = 0
        if self._unacknowledged >= WINDOW_UPDATE_THRESHOLD:
            updates.append(WindowUpdate(0, self._unacknowledged))
            self._unacknowledged = 0
        if updates:
            await self._send(*updates)

    async def _send(self, *frames: Frame) -> None:
        # Encoding happens under the lock too: header compression state must
        # advance in the order the frames reach the wire.
        async with self._send_lock:
            if self.closed.is_set():
                return
            try:
                await self._write(b"".join(self._codec.encode(frame) for frame in frames))
            except ConnectionError:
                self._shut_down()

    def _forget_if_done(self, stream: Stream) -> None:
        if not stream._remote_open and not stream._local_open:
            self._streams.pop(stream.id, None)

    def _shut_down(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self._streams.values()):
            stream._abort()
        self._opened.put_nowait(None)
