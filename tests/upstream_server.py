"""A small HTTP/1.1 upstream for the gateway's integration tests, run as its own process.

It reports what it received, streams watch-like chunked events, switches protocols, answers
SubjectAccessReviews from a fixed rule (and records them), and misbehaves on request, so tests
can observe the gateway from the cluster's side.
Usage: python upstream_server.py CERT KEY  (prints the port it listens on, then serves).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import struct
import sys
import time
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

connection_ids = itertools.count(1)
watches = {"open": 0, "closed": 0}
ended_watches: list[str] = []  # the ?tag= of every watch that ended, for tests to find their own
hits: dict[str, int] = {}
reviews: list[dict] = []  # every SubjectAccessReview received: its headers and body


def review(body: bytes) -> tuple[str, bytes]:
    """The rule: "alice" may impersonate any user, group, uid, extra value or service account
    whose name starts with "allowed-"; a name "sar-fails" makes the review itself fail."""
    spec = json.loads(body)["spec"]
    attributes = spec["resourceAttributes"]
    if attributes.get("name") == "sar-fails":
        return "500 Internal Server Error", json.dumps({"kind": "Status", "code": 500, "message": "etcd is down"}).encode()
    allowed = (spec["user"] == "alice" and attributes["verb"] == "impersonate"
               and attributes.get("name", "").startswith("allowed-"))
    answer = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec,
              "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it"})}}
    return "201 Created", json.dumps(answer).encode()


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    return method, target, version, headers


def header(headers, name):
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if values else None


async def read_body(reader, headers):
    if (header(headers, "transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if size == 0:
                return body, "chunked"
    length = int(header(headers, "content-length") or 0)
    return await reader.readexactly(length), "length"


def respond(writer, status, body: bytes, content_type="application/json", extra=(), head_only=False):
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}", *extra]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body))


async def watch(writer, query):
    count = int(query.get("count", ["1000000"])[0])
    interval = float(query.get("interval", ["0.05"])[0])
    size = int(query.get("size", ["100"])[0])
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    watches["open"] += 1
    try:
        for i in range(count):
            event = json.dumps({"type": "MODIFIED", "object": {"n": i, "sent": time.time(), "pad": "x" * size}}).encode() + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(interval)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    finally:
        watches["open"] -= 1
        watches["closed"] += 1
        ended_watches.extend(query.get("tag", []))


async def tunnel(reader, writer, headers):
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                 + header(headers, "upgrade").encode() + b"\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                 + b"X-Received: " + json.dumps(headers).encode() + b"\r\n\r\n")
    writer.write(b"hello from upstream\n")
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()


async def handle(reader, writer):
    conn_id = next(connection_ids)
    try:
        while True:
            try:
                method, target, version, headers = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            url = urlsplit(target)
            query = parse_qs(url.query)
            path = url.path.rsplit("/", 1)[-1] if "/" in url.path else url.path
            path = query.get("serve", [path])[0]  # ?serve=watch: a watch behind any Kubernetes path
            hits[path] = hits.get(path, 0) + 1
            if path == "upgrade" and header(headers, "upgrade"):
                await tunnel(reader, writer, headers)
                return
            if path == "stall":  # reads the request body only after a pause, in small pieces
                await asyncio.sleep(float(query["delay"][0]))
                remaining, size = int(header(headers, "content-length")), 0
                while remaining:
                    piece = await reader.read(min(remaining, 65536))
                    remaining, size = remaining - len(piece), size + len(piece)
                respond(writer, "200 OK", json.dumps({"received": size}).encode())
                await writer.drain()
                continue
            body, framing = await read_body(reader, headers)
            if path == "subjectaccessreviews" and method == "POST":
                reviews.append({"headers": headers, "body": json.loads(body)})
                status, answer = review(body)
                half = len(answer) // 2  # chunked, as API servers often answer
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n".encode())
                for piece in (answer[:half], answer[half:]):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            elif path == "reviews":
                respond(writer, "200 OK", json.dumps(reviews).encode())
            elif path == "watch":
                await watch(writer, query)
            elif path == "big":
                size = int(query["size"][0])
                block = (b"0123456789abcdef" * 4096)
                if "chunked" in query:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    sent = 0
                    while sent < size:
                        piece = block[: min(len(block), size - sent)]
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        sent += len(piece)
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    sent = 0
                    while sent < size:
                        piece = block[: min(len(block), size - sent)]
                        writer.write(piece)
                        sent += len(piece)
                        await writer.drain()
            elif path == "upgrade":
                respond(writer, "403 Forbidden", b'{"kind":"Status","code":403}')
            elif path == "redirect":
                respond(writer, "302 Found", b"", extra=("Location: https://example.invalid/", f"X-Conn: {conn_id}"))
            elif path == "slow":
                await asyncio.sleep(float(query["delay"][0]))
                respond(writer, "200 OK", b"{}")
            elif path == "close":
                return
            elif path == "nolength":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end")
                await writer.drain()
                return
            elif path == "raw":  # misbehaves as asked: ?send=BYTES[&pad=N][&pause=SECONDS&then=BYTES][&reset=1]
                parts = dict(pair.partition("=")[::2] for pair in url.query.split("&"))
                writer.write(unquote_to_bytes(parts["send"]) + b"x" * int(parts.get("pad", "0")))
                if "pause" in parts:
                    await writer.drain()
                    await asyncio.sleep(float(parts["pause"]))
                    writer.write(unquote_to_bytes(parts.get("then", "")))
                await writer.drain()
                if "reset" in parts:  # end with a TCP reset, no TLS close_notify: the cluster crashed
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                return
            elif path == "hopbyhop":
                respond(writer, "200 OK", b"{}", extra=("Connection: X-Secret", "X-Secret: 1", "Keep-Alive: timeout=5", "X-Kept: yes"))
            elif path == "stats":
                respond(writer, "200 OK", json.dumps({**watches, "hits": hits, "ended": ended_watches}).encode())
            else:
                seen = {"conn": conn_id, "method": method, "target": target, "version": version,
                        "headers": headers, "body": body.decode("latin-1"), "framing": framing,
                        "tls_resumed": writer.get_extra_info("ssl_object").session_reused}
                respond(writer, "200 OK", json.dumps(seen).encode(), head_only=method == "HEAD")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
