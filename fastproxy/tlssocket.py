"""TLS on a non-blocking ssl.SSLSocket, driven by the event loop's readiness callbacks: to the
clusters (open_tls_connection) and from clients (TLSListener).

uvloop's TLS transport runs OpenSSL over memory BIOs: each record is received into a
Python buffer, copied into the BIO, decrypted through a state machine and handed on, and
every write goes the same way back. Here OpenSSL reads and writes the socket itself, one C
call per record, and a connection holds no read buffer of its own between reads: in a bare
forwarder that took user CPU per small request from ~30 µs to ~18 µs, and memory per
upstream watch from 38 to 26 KiB in the gateway (README, Performance).

TLSSocketTransport implements the part of asyncio.Transport that the gateway's protocols use.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable

from .accepting import Acceptor

RECORD = 16384            # the largest TLS record payload: a full one suggests more are queued
READ_BUDGET = 256 * 1024  # bytes read per readiness callback before the loop gets a turn
DRAIN_TIMEOUT = 10.0      # how long a closing connection waits for the peer to close its side
_WAIT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# Stands in for a protocol once it has been told the connection is lost: its callbacks do nothing.
_DONE = asyncio.Protocol()

log = logging.getLogger("fastproxy")


class TLSSocketTransport(asyncio.Transport):
    __slots__ = (
        "_loop", "_sock", "_fd", "_protocol", "_read", "_send", "_pending", "_buffer", "_buffer_size", "_high", "_low",
        "_reading", "_writer_on", "_write_waits_read", "_protocol_paused", "_closing", "_closed",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol):
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        # The C object under the SSLSocket: its methods are what SSLSocket.recv/send/pending
        # end up calling after three Python frames of checks this transport does once.
        tls = sock._sslobj
        self._read, self._send, self._pending = tls.read, tls.write, tls.pending
        # A list, not a deque: it rarely holds more than a few pieces, and an empty deque
        # costs 600 bytes more than an empty list on each of thousands of watch connections.
        self._buffer: list[bytes | memoryview] = []
        self._buffer_size = 0
        self._high, self._low = 64 * 1024, 16 * 1024
        self._reading = True
        self._writer_on = False
        self._write_waits_read = False  # a write needs the peer's bytes first (renegotiation)
        self._protocol_paused = False
        self._closing = False
        self._closed = False
        protocol.connection_made(self)
        if self._reading:
            loop.add_reader(self._fd, self._read_ready)

    # --- reading -----------------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._write_waits_read:
            self._write_waits_read = False
            self._write_ready()
        if not self._reading:
            return  # paused or closed since this call was scheduled
        try:
            data = self._read(RECORD)
        except _WAIT:
            return
        except ssl.SSLEOFError:
            data = b""  # closed without close_notify: what ends an unframed response
        except (OSError, ssl.SSLError) as exc:
            self._fatal(exc)
            return
        if 0 < len(data) < RECORD and not self._closed:
            # A short record (nearly every watch event) usually ends a burst, and a read of RECORD
            # bytes takes all of a record's plaintext, so none waits decrypted behind it: handed
            # on as read, and the socket's readiness says if more came.
            try:
                self._protocol.data_received(data)
            except Exception as exc:
                self._protocol_failed(exc, "data_received")
            return
        self._read_on(data)

    def _read_on(self, first: bytes) -> None:
        """After a full record (more may be queued: read on, up to READ_BUDGET) or the end (b"")."""
        read, pending = self._read, self._pending
        chunks = [first] if first else []
        total = len(first)
        eof = not first
        try:
            while not eof and total < READ_BUDGET and len(chunks[-1]) == RECORD:
                data = read(RECORD)
                if not data:
                    eof = True  # close_notify
                    break
                chunks.append(data)
                total += len(data)
        except _WAIT:
            pass
        except ssl.SSLEOFError:
            eof = True  # closed without close_notify: what ends an unframed response
        except (OSError, ssl.SSLError) as exc:
            self._deliver(chunks)
            self._fatal(exc)
            return
        self._deliver(chunks)
        if self._closing:
            return
        if eof:
            self._eof()
        elif total >= READ_BUDGET and self._reading and pending():
            self._loop.call_soon(self._read_ready)  # decrypted bytes the socket will not signal

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks or self._closed:
            return
        try:
            self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except Exception as exc:
            self._protocol_failed(exc, "data_received")

    def _eof(self) -> None:
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._protocol_failed(exc, "eof_received")
            return
        if not keep_open:
            self.close()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def pause_reading(self) -> None:
        if not self._closed:
            self._stop_reading()

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        if self._pending():
            self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading

    def check_reset(self) -> None:
        """Fail if the socket holds an error that no read reported: a reset that came while
        reading was paused, or one the poll lost (uvloop drops a reader's poll on an error
        after one call; resets right after a client's first bytes go unseen that way)."""
        if self._closed:
            return
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fatal(OSError(error, os.strerror(error)))

    # --- writing -----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if self._buffer or self._write_waits_read:
            self._buffer.append(data)
            self._buffer_size += len(data)
            self._maybe_pause_protocol()
            return
        try:
            sent = self._send(data)
        except ssl.SSLWantWriteError:
            sent = 0
        except ssl.SSLWantReadError:
            sent = 0
            self._write_waits_read = True
        except (OSError, ssl.SSLError) as exc:
            self._fatal(exc)
            return
        if sent < len(data):
            # OpenSSL wants the same bytes again, from the start of what it did not confirm.
            rest = memoryview(data)[sent:] if sent else data
            self._buffer.append(rest)
            self._buffer_size += len(rest)
            if not self._write_waits_read:
                self._start_writer()
            self._maybe_pause_protocol()

    def writelines(self, parts) -> None:
        # One record and one send for a head and a small body; joining a single bytes is free.
        self.write(b"".join(parts))

    def _start_writer(self) -> None:
        if not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        buffer = self._buffer
        send = self._send
        while buffer:
            data = buffer[0]
            try:
                sent = send(data)
            except ssl.SSLWantWriteError:
                self._start_writer()
                return
            except ssl.SSLWantReadError:
                self._write_waits_read = True
                self._stop_writer()
                return
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            self._buffer_size -= sent
            if sent < len(data):
                buffer[0] = memoryview(data)[sent:]
                self._start_writer()
                return
            del buffer[0]
        self._stop_writer()
        if self._protocol_paused and self._buffer_size <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._protocol_failed(exc, "resume_writing")
                return
        if self._closing:
            self._half_close()

    def _stop_writer(self) -> None:
        if self._writer_on:
            self._writer_on = False
            self._loop.remove_writer(self._fd)

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and self._buffer_size > self._high:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                self._protocol_failed(exc, "pause_writing")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low
        self._maybe_pause_protocol()

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    # --- closing -----------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, send what is buffered, then close."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._half_close()
        elif self._write_waits_read:
            self._shutdown(None)  # the bytes it waits for will not be read now

    def abort(self) -> None:
        self._closing = True
        self._shutdown(None)

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self._shutdown(exc)

    def _protocol_failed(self, exc: Exception, callback: str) -> None:
        self._loop.call_exception_handler({
            "message": f"protocol failed in {callback}", "exception": exc,
            "transport": self, "protocol": self._protocol,
        })
        self.abort()

    def _half_close(self) -> None:
        """Everything is sent: say so, and tell the protocol the connection is over.

        The protocol is told at once: it is done with the connection, and a drain or a pool
        should not wait on a peer that is slow to close. The socket lingers on its own.
        """
        self._stop_writer()
        try:
            self._sock.unwrap()  # close_notify; the peer's own is not waited for
        except (OSError, ValueError, ssl.SSLError):
            pass
        self._tell_lost(None)
        linger(self._loop, self._sock)

    def _shutdown(self, exc: BaseException | None) -> None:
        if self._closed:
            return  # told already; a lingering socket closes by itself
        self._tell_lost(exc)
        self._loop.remove_reader(self._fd)
        self._sock.close()

    def _tell_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._stop_writer()
        self._buffer.clear()
        self._buffer_size = 0
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        # The protocol refers to this transport too; letting go of it (as asyncio's transports do)
        # leaves no cycle, so both, and the TLS state under the socket, go at once by reference
        # count instead of waiting for a full collection.
        protocol, self._protocol = self._protocol, _DONE
        protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default=None):
        sock = self._sock
        if name in ("socket", "ssl_object"):
            return sock
        if self._closed:
            return default
        if name == "sslcontext":
            return sock.context
        info = {"peername": sock.getpeername, "sockname": sock.getsockname, "peercert": sock.getpeercert,
                "cipher": sock.cipher}.get(name)
        if info is None:
            return default
        try:
            return info()
        except OSError:  # a peer that reset the connection right after its handshake has no name left
            return default


def linger(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float = DRAIN_TIMEOUT) -> None:
    """Half-close `sock`, drop what the peer still sends until it closes too (or `timeout`), then close.

    Closing a socket with unread bytes in it (a late session ticket, the rest of a request)
    sends a reset, and the peer may then lose data it received but had not read yet.
    """
    fd = sock.fileno()
    try:
        sock.shutdown(socket.SHUT_WR)  # an SSLSocket reads raw bytes from here on
    except OSError:
        sock.close()
        return

    def close() -> None:
        if sock.fileno() >= 0:
            timer.cancel()
            loop.remove_reader(fd)
            sock.close()

    def drain() -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        close()

    timer = loop.call_later(timeout, close)
    loop.add_reader(fd, drain)


class TLSListener(Acceptor):
    """Accepts clients on a listening socket, completes each TLS handshake, then starts a transport.

    A handshake is a few callbacks on the socket's readiness, not a task; a client that has not
    finished it within `handshake_timeout` seconds is dropped. A client that sends plain HTTP
    gets `plain_http_answer` in the clear, so that it can tell its user what went wrong.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        context: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.Protocol],
        handshake_timeout: float,
        plain_http_answer: bytes = b"",
    ):
        super().__init__(loop, listener)
        self.context = context
        self._protocol_factory = protocol_factory
        self._handshake_timeout = handshake_timeout
        self._plain_http_answer = plain_http_answer

    def accepted(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            return
        self._handshake(tls)

    def _handshake(self, tls: ssl.SSLSocket) -> None:
        self.handshakes += 1

        def done(error: BaseException | None) -> None:
            self.handshakes -= 1
            timer.cancel()
            if error is None:
                TLSSocketTransport(self._loop, tls, self._protocol_factory())
                return
            log.debug("TLS handshake failed: %s", error)  # scanners and plain-HTTP clients: routine
            if self._plain_http_answer and getattr(error, "reason", None) == "HTTP_REQUEST":
                try:
                    socket.socket.send(tls, self._plain_http_answer)  # the plain socket's send: no TLS here
                except OSError:
                    pass
                linger(self._loop, tls)  # the rest of the request is still unread
            else:
                tls.close()

        def give_up() -> None:
            self.handshakes -= 1
            handshake.cancel()
            tls.close()

        timer = self._loop.call_later(self._handshake_timeout, give_up)
        handshake = _Handshake(self._loop, tls, done)


class _Handshake:
    """Drives a non-blocking TLS handshake on the socket's readiness; calls `done(error)` once."""

    __slots__ = ("_loop", "_sock", "_fd", "_done", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 done: Callable[[BaseException | None], None]):
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._done = done
        self._waiting: Callable | None = None  # the loop's remove_reader or remove_writer
        self._step()

    def _step(self) -> None:
        loop = self._loop
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(loop.add_reader, loop.remove_reader)
            return
        except ssl.SSLWantWriteError:
            self._wait(loop.add_writer, loop.remove_writer)
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.cancel()
            self._done(exc)
            return
        self.cancel()
        self._done(None)

    def _wait(self, add: Callable, remove: Callable) -> None:
        if self._waiting is not remove:
            self.cancel()
            add(self._fd, self._step)
            self._waiting = remove

    def cancel(self) -> None:
        """Stop watching the socket (the caller closes it)."""
        if self._waiting is not None:
            self._waiting(self._fd)
            self._waiting = None


async def open_tls_connection(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_hostname: str,
    session: ssl.SSLSession | None = None,
) -> TLSSocketTransport:
    """Connect, complete the TLS handshake (resuming `session` if the server agrees) and start a transport."""
    sock = await _connect(loop, host, port)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False, session=session)
    except BaseException:
        sock.close()
        raise
    finished = loop.create_future()

    def done(error: BaseException | None) -> None:
        if not finished.done():
            finished.set_result(error)

    handshake = _Handshake(loop, tls, done)
    try:
        error = await finished
    except BaseException:  # cancelled, by a connect timeout say
        handshake.cancel()
        tls.close()
        raise
    if error is not None:
        tls.close()
        raise error
    return TLSSocketTransport(loop, tls, protocol_factory())


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    try:
        addresses = [(socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET, (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(family, address) for family, _, _, _, address in infos]
    if not addresses:
        raise OSError(f"{host} has no address")
    error: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error
