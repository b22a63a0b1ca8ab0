"""The streaming half of the bench upstream: a chunked LIST of ~1 KB ConfigMaps and watch streams.

The upstream nginx terminates plain HTTP and TLS and forwards every request except the small GET
here, over a unix socket. Watch streams get one ADDED event at once (so every proxy has flushed
its response headers) and then MODIFIED events broadcast to all watchers on a timer, at a total
rate that stays the same whatever the number of watchers. Each event carries the CLOCK_MONOTONIC
time of its own write, so the client can measure delivery latency across processes.

Watches under SAME_PREFIX (the watch-same workload) are different: each resource (path and query)
gets events at a rate per resource, however many streams watch it, so a proxy that shares one
upstream stream among its clients delivers as many events as one that opens a stream per client.
GET CONTROL_PATH?rate=R answers how many such streams were opened since the last call, starts the
count again and sets the rate per resource.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
import urllib.parse

import httptools
import uvloop

LIST_CHUNK_BYTES = 16 * 1024
MAX_BROADCASTS_PER_SECOND = 200
SAME_PREFIX = b"/api/v1/namespaces/bench-same/"
CONTROL_PATH = b"/bench/watch-same"
SENT_NS_DIGITS = 20  # fixed width keeps every event the same size, so its chunk header is precomputed

RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND_BODY = b'{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(NOT_FOUND_BODY),
    NOT_FOUND_BODY,
)


def configmap(index: int) -> bytes:
    """One ~1 KB list item."""
    return (
        b'{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm-%07d","namespace":"default",'
        b'"uid":"6a1c4f9e-0d3b-4a57-9e8f-%012d","resourceVersion":"1","labels":{"app":"bench"}},'
        b'"data":{"payload":"%s"}}' % (index, index, b"x" * 830)
    )


def chunked_list_response(total_bytes: int) -> bytes:
    items = [configmap(i) for i in range(total_bytes // (len(configmap(0)) + 1))]
    body = b'{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[%s]}' % (
        b",".join(items)
    )
    chunks = [
        b"%x\r\n%s\r\n" % (len(body[i : i + LIST_CHUNK_BYTES]), body[i : i + LIST_CHUNK_BYTES])
        for i in range(0, len(body), LIST_CHUNK_BYTES)
    ]
    return RESPONSE_HEAD + b"".join(chunks) + b"0\r\n\r\n"


class WatchEvents:
    """Pre-split event bytes: only the send timestamp is formatted per write."""

    def __init__(self, event_type: str) -> None:
        annotation = b'"bench.fastproxy.io/sent-ns":"'
        line_head = b'{"type":"%s","object":{"metadata":{"annotations":{%s' % (event_type.encode(), annotation)
        line_tail = (
            b'"},"name":"watched","namespace":"default","resourceVersion":"2"},'
            b'"apiVersion":"v1","kind":"ConfigMap","data":{"payload":"%s"}}}\n' % (b"y" * 850)
        )
        line_bytes = len(line_head) + SENT_NS_DIGITS + len(line_tail)
        self.head = b"%x\r\n%s" % (line_bytes, line_head)
        self.tail = line_tail + b"\r\n"

    def stamped(self) -> bytes:
        return b"%s%020d%s" % (self.head, time.monotonic_ns(), self.tail)


ADDED = WatchEvents("ADDED")
MODIFIED = WatchEvents("MODIFIED")


class SameResources:
    """The watch-same streams by resource, their rate per resource, and how many were opened."""

    def __init__(self) -> None:
        self.watchers: collections.defaultdict[bytes, set[UpstreamConnection]] = collections.defaultdict(set)
        self.per_second = 0.0
        self.opened = 0

    def control(self, query: bytes) -> bytes:
        rate = urllib.parse.parse_qs(query.decode()).get("rate", ["0"])[0]
        opened, self.opened, self.per_second = self.opened, 0, float(rate)
        body = b'{"opened":%d}' % opened
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, list_response: bytes, watchers: set[UpstreamConnection], same: SameResources) -> None:
        self.list_response = list_response
        self.watchers = watchers
        self.same = same
        self.resource = b""
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.watchers.discard(self)
        if self.resource:
            self.same.watchers[self.resource].discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self.url)
        url, self.url = self.url, b""
        if b"watch=true" in (parsed.query or b"") or b"watch=1" in (parsed.query or b""):
            self.transport.write(RESPONSE_HEAD + ADDED.stamped())
            if parsed.path.startswith(SAME_PREFIX):
                self.resource = url
                self.same.watchers[url].add(self)
                self.same.opened += 1
            else:
                self.watchers.add(self)
        elif parsed.path == CONTROL_PATH:
            self.transport.write(self.same.control(parsed.query or b""))
        elif parsed.path == b"/api/v1/configmaps":
            self.transport.write(self.list_response)
        else:
            self.transport.write(NOT_FOUND)


async def broadcast(watchers: set[UpstreamConnection], events_per_second: float) -> None:
    while True:
        if not watchers:
            await asyncio.sleep(0.05)
            continue
        interval = 1 / min(MAX_BROADCASTS_PER_SECOND, events_per_second / len(watchers))
        started = time.monotonic()
        for watcher in list(watchers):
            watcher.transport.write(MODIFIED.stamped())
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def broadcast_same(same: SameResources) -> None:
    """One event per resource per tick, to every stream watching it."""
    while True:
        if not same.per_second:
            await asyncio.sleep(0.05)
            continue
        started = time.monotonic()
        for watchers in list(same.watchers.values()):
            event = MODIFIED.stamped()  # one event of the resource, one stamp, however many streams carry it
            for watcher in list(watchers):
                watcher.transport.write(event)
        await asyncio.sleep(max(0.0, 1 / min(MAX_BROADCASTS_PER_SECOND, same.per_second) - (time.monotonic() - started)))


async def serve(socket_path: str, list_bytes: int, events_per_second: float) -> None:
    list_response = chunked_list_response(list_bytes)
    watchers: set[UpstreamConnection] = set()
    same = SameResources()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: UpstreamConnection(list_response, watchers, same), socket_path, backlog=4096
    )
    os.chmod(socket_path, 0o666)  # nginx workers may run as another user
    async with server:
        await asyncio.gather(broadcast(watchers, events_per_second), broadcast_same(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--list-mb", type=float, default=50)
    parser.add_argument("--watch-events-per-second", type=float, default=10_000)
    args = parser.parse_args()
    uvloop.run(serve(args.socket, int(args.list_mb * 1e6), args.watch_events_per_second))


if __name__ == "__main__":
    main()
