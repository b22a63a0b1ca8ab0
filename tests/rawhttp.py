"""A raw HTTP/1.1 client over real (TLS) sockets, for tests that need byte-level control."""
from __future__ import annotations

import socket
import ssl

import httptools
import orjson


class Response:
    def __init__(self):
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.chunks: list[bytes] = []
        self.complete = False
        self.keep_alive = True

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None

    def json(self):
        return orjson.loads(self.body)


class Client:
    """One connection; send raw bytes, read parsed responses one at a time."""

    def __init__(self, port: int, ca_file=None, timeout: float = 5.0):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
            context.set_alpn_protocols(["http/1.1"])
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buffer = b""
        self.responses: list[Response] = []
        self._current: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.eof = False

    # parser callbacks
    def on_message_begin(self):
        self._current = Response()

    def on_header(self, name, value):
        self._current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self):
        self._current.status = self.parser.get_status_code()
        self._current.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body):
        self._current.body += body
        self._current.chunks.append(body)

    def on_message_complete(self):
        self._current.complete = True
        self.responses.append(self._current)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def read_some(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
        return data

    def response(self) -> Response:
        """The next complete response (raises on timeout or EOF before it)."""
        while not self.responses:
            data = self.read_some()
            if not data:
                if self._current is not None and not self._current.complete:
                    self.parser.feed_data(b"")
                raise ConnectionError("connection closed before a complete response")
            self.parser.feed_data(data)
        return self.responses.pop(0)

    def head(self) -> Response:
        """Read until the next response's head is parsed (for streams that never end)."""
        while self._current is None or not self._current.status:
            data = self.read_some()
            if not data:
                raise ConnectionError("connection closed before a response head")
            self.parser.feed_data(data)
        return self._current

    def feed_until(self, predicate, what: str = "data") -> None:
        while not predicate():
            data = self.read_some()
            if not data:
                raise ConnectionError(f"connection closed while waiting for {what}")
            self.parser.feed_data(data)

    def closed_by_peer(self) -> bool:
        """True when the peer closed the connection (after any pending bytes)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.parser.feed_data(data)
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
