"""Watch fan-out load: N concurrent watch streams through one target, timing each event's delivery.

The harness drives it over stdin/stdout, one JSON object per output line:
  -> {"phase": "connected", ...}  once every stream has received its first event (or failed)
  <- start                        count events from now on
  <- stop                         -> {"phase": "stats", ...}, then exit
Latency is CLOCK_MONOTONIC at receipt minus the upstream's CLOCK_MONOTONIC at write, both on
this machine. The window counts the events written between start and stop (by their stamp),
waiting SETTLE_S after stop for those still in flight, so that every stream of one resource
should count the same: `missed` is how many fewer than the most any stream of its resource got.
With --resources G, stream i watches `--url` with `{resource}` replaced by i % G.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import sys
import time
import urllib.parse

import httptools
import uvloop

SENT_NS_MARKER = b'"bench.fastproxy.io/sent-ns":"'
SENT_NS_DIGITS = 20
SETTLE_S = 1.0


class Tally:
    def __init__(self) -> None:
        self.counting = False
        self.from_ns = 0
        self.until_ns = 1 << 64
        self.events = 0
        self.latencies_ns: list[int] = []
        self.streams_lost = 0

    def record(self, line: bytes, received_ns: int) -> bool:
        """Whether the event counts: written inside the window."""
        if not self.counting:
            return False
        start = line.find(SENT_NS_MARKER) + len(SENT_NS_MARKER)
        sent_ns = int(line[start : start + SENT_NS_DIGITS])
        if not self.from_ns <= sent_ns <= self.until_ns:
            return False
        self.events += 1
        self.latencies_ns.append(received_ns - sent_ns)
        return True


class WatchStream(asyncio.Protocol):
    def __init__(self, request: bytes, resource: int, tally: Tally, first_event: asyncio.Future) -> None:
        self.request = request
        self.resource = resource
        self.events = 0
        self.tally = tally
        self.first_event = first_event
        self.parser = httptools.HttpResponseParser(self)
        self.pending = b""
        self.received_ns = 0
        self.established = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received_ns = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.fail(f"bad HTTP: {error}")

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() != 200:
            self.fail(f"HTTP {self.parser.get_status_code()}")

    def on_body(self, body: bytes) -> None:
        *lines, self.pending = (self.pending + body).split(b"\n")
        for line in lines:
            self.events += self.tally.record(line, self.received_ns)
        if lines and not self.established:
            self.established = True
            self.first_event.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.established:
            self.tally.streams_lost += 1
        elif not self.first_event.done():
            self.first_event.set_exception(ConnectionError(f"closed before the first event: {exc}"))

    def fail(self, reason: str) -> None:
        if not self.first_event.done():
            self.first_event.set_exception(ConnectionError(reason))
        self.transport.close()


async def open_streams(args: argparse.Namespace, tally: Tally) -> tuple[list[WatchStream], collections.Counter]:
    url = urllib.parse.urlsplit(args.url)
    headers = "".join(f"{header}\r\n" for header in args.header)
    requests = [
        f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: application/json\r\n{headers}\r\n"
        .replace("{resource}", str(resource)).encode()
        for resource in range(args.resources)
    ]
    tls = ssl.create_default_context(cafile=args.cafile) if url.scheme == "https" else None
    loop = asyncio.get_running_loop()
    # Bounded concurrency: a burst of thousands of SYNs overflows accept backlogs (Python's default is 100).
    gate = asyncio.Semaphore(args.connect_concurrency)
    failures: collections.Counter = collections.Counter()
    deadline = loop.time() + args.setup_timeout

    async def open_one(resource: int) -> WatchStream | None:
        async with gate:
            first_event = loop.create_future()
            timeout = max(0.1, min(args.timeout, deadline - loop.time()))
            try:
                _, stream = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: WatchStream(requests[resource], resource, tally, first_event), url.hostname, url.port, ssl=tls
                    ),
                    timeout,
                )
                await asyncio.wait_for(first_event, timeout)
                return stream
            except (TimeoutError, OSError) as error:
                failures[f"{type(error).__name__}: {error}"[:200]] += 1
                return None

    streams = await asyncio.gather(*(open_one(number % args.resources) for number in range(args.streams)))
    return [stream for stream in streams if stream], failures


def percentile_ms(sorted_ns: list[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, int(fraction * len(sorted_ns)))] / 1e6


def missed_events(streams: list[WatchStream]) -> int:
    """Events short of the most any stream of the same resource counted, over all streams."""
    most: collections.Counter = collections.Counter()
    for stream in streams:
        most[stream.resource] = max(most[stream.resource], stream.events)
    return sum(most[stream.resource] - stream.events for stream in streams)


def emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    tally = Tally()

    setup_started = time.monotonic()
    streams, failures = await open_streams(args, tally)
    emit(
        {
            "phase": "connected",
            "streams": len(streams),
            "failed": sum(failures.values()),
            "failures": failures.most_common(3),
            "setup_s": time.monotonic() - setup_started,
        }
    )

    await commands.readline()  # start
    tally.from_ns = time.monotonic_ns()
    tally.counting, window_started = True, time.monotonic()
    await commands.readline()  # stop
    tally.until_ns = time.monotonic_ns()
    window_s = time.monotonic() - window_started
    await asyncio.sleep(SETTLE_S)
    tally.counting = False
    latencies = sorted(tally.latencies_ns)
    emit(
        {
            "phase": "stats",
            "events": tally.events,
            "window_s": window_s,
            "events_per_s": tally.events / window_s,
            "latency_p50_ms": percentile_ms(latencies, 0.50),
            "latency_p99_ms": percentile_ms(latencies, 0.99),
            "latency_max_ms": percentile_ms(latencies, 1.0),
            "streams_lost": tally.streams_lost,
            "missed": missed_events(streams),
        }
    )
    for stream in streams:
        stream.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="watch URL, e.g. http://127.0.0.1:8080/api/v1/...?watch=true")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--resources", type=int, default=1, help="distinct watches, {resource} in --url")
    parser.add_argument("--header", action="append", default=[], help="extra request header line")
    parser.add_argument("--cafile", help="CA bundle for https URLs")
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=30, help="seconds for one stream to get its first event")
    parser.add_argument("--setup-timeout", type=float, default=180, help="seconds for all streams to open")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
