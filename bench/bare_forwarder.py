"""The bare forwarder: issue #17's yardstick, the least a uvloop + httptools proxy can do per request.

    python bench/bare_forwarder.py --listen HOST:PORT --upstream https://HOST:PORT --ca FILE
                                   --token-file FILE [--tls-cert FILE --tls-key FILE]

One protocol per client connection and one upstream connection (TLS, uvloop's) per client
connection, opened when the client connects; requests are parsed with httptools and their head
rebuilt without hop-by-hop headers, with the upstream's Host and bearer token (as nginx and the Go
proxy add theirs); bodies pass as parsed (chunked ones re-framed). Responses are parsed only to
check them and relayed byte for byte: in order, as HTTP/1.1 keeps them on one connection. No client
authentication, no observers, no pool. Bench code, not product code.
"""
from __future__ import annotations

import argparse
import asyncio
import ssl
import urllib.parse

import httptools
import uvloop

# Not forwarded: hop-by-hop, or replaced by the forwarder's own (Host, Authorization).
DROPPED = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                     b"host", b"authorization"))


class Upstream(asyncio.Protocol):
    """The client connection's own connection to the upstream: responses go straight back."""

    def __init__(self, client: Client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.upstream_ready(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.transport.abort()
            return
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Client(asyncio.Protocol):
    def __init__(self, forwarder: Forwarder):
        self.forwarder = forwarder
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # what the client sent before the upstream connection was up
        self.url = b""
        self.headers: list[bytes] = []
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.forwarder.connect(self)

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        if self.transport.is_closing():
            transport.close()  # the client left while the connection was being opened
            return
        self.upstream = transport
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def _send(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = [b"", self.forwarder.host_and_credential]  # the request line goes first
        self.chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname not in DROPPED:
            self.headers += (name, b": ", value, b"\r\n")
        if lname == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self) -> None:
        headers = self.headers
        headers[0] = self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"
        headers.append(b"\r\n")
        self._send(b"".join(headers))

    def on_body(self, body: bytes) -> None:
        self._send(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self._send(b"0\r\n\r\n")


class Forwarder:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: str, ca: str, token: str):
        parts = urllib.parse.urlsplit(upstream)
        self.loop = loop
        self.host, self.port = parts.hostname, parts.port
        self.context = ssl.create_default_context(cafile=ca)
        self.host_and_credential = f"Host: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n".encode()

    def connect(self, client: Client) -> None:
        def failed(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is not None:
                client.transport.close()

        connecting = self.loop.create_connection(lambda: Upstream(client), self.host, self.port, ssl=self.context)
        self.loop.create_task(connecting).add_done_callback(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="https://HOST:PORT")
    parser.add_argument("--ca", required=True, help="the CA that signed the upstream's certificate")
    parser.add_argument("--token-file", required=True, help="the upstream's bearer token")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (and --tls-key)")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    server_context = None
    if args.tls_cert:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(args.tls_cert, args.tls_key)
    loop = uvloop.new_event_loop()
    with open(args.token_file) as token:
        forwarder = Forwarder(loop, args.upstream, args.ca, token.read().strip())
    host, _, port = args.listen.rpartition(":")
    loop.run_until_complete(loop.create_server(lambda: Client(forwarder), host, int(port), ssl=server_context,
                                               backlog=4096))
    loop.run_forever()


if __name__ == "__main__":
    main()
