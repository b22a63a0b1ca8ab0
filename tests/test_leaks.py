"""Leak checks on the real gateway process: file descriptors and resident memory after 10,000
client connections dropped abruptly, and through a mixed soak (SOAK_SECONDS, default 30).

A client's reset is not always reported by a read: uvloop drops a reader's poll on an error
after one call, and a paused reader has no poll. The worker's once-a-second sweep finds the
reset of a client waiting on a deadline (SO_ERROR); a handshake left unfinished waits for
header_timeout. These tests wait for the count to come back down."""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time

import pytest

from tests.helpers import ACCESS_KEY, start_gateway
from tests.test_proxy import BASE

DROPS = 10_000
ROUNDS = 5
POOL_IDLE = 8  # idle connections the cluster's pool may keep (max_idle_connections, set so here)
CONCURRENCY = 50
RESET_UPLOADS = 200
RSS_ROUNDS_BOUND = 16 * 2**20  # RSS growth after the first round (see the test)
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
RESPONSE_HEADER_TIMEOUT = 2
SOAK_CLIENTS = 7  # at once in the soak: as many idle upstream connections may stay in the pool
# The bound on the soak's RSS slope (least squares, after the warm-up third). Measured in 30 s
# soaks: 300-670 KiB/s with the leaks this mix found (a TLS session copied per upstream dial;
# closed connections left to the cycle collector: 110 KiB/s alone); 2-5 KiB/s without them, on
# a machine at load 4-5. A lone step of the allocator of up to 0.4 MiB in the middle of the
# 20 s window still passes (a step h there slopes 3h / 2T).
RSS_SLOPE_BOUND = 32 * 1024
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST, as a client that vanished
AUTH_LINE = f"Authorization: Bearer {ACCESS_KEY}\r\n"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def gateway(gateway_config, tmp_path):
    source, text = gateway_config
    for name in ("token", "key"):
        (tmp_path / name).write_text((source / name).read_text())
    process = start_gateway(text.replace("response_header_timeout = 3\n",
                                         f"response_header_timeout = {RESPONSE_HEADER_TIMEOUT}\n"
                                         f"        max_idle_connections = {POOL_IDLE}\n"), tmp_path)
    yield process
    process.stop()


def client_context(tls_files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files["ca"]))


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake, as bytes to send on a plain socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# What each dropped client had sent when it vanished (after the TLS handshake, unless the first).
DROPPED_AT = (
    "mid-handshake",
    f"GET {BASE}/echo HTTP/1.1\r\nHost: g\r\n".encode(),                                   # mid-request head
    f"PUT {BASE}/echo HTTP/1.1\r\nHost: g\r\n{AUTH_LINE}Content-Length: 1000000\r\n\r\n".encode()
    + b"u" * 4000,                                                                        # mid-upload
    f"GET {BASE}/slow?delay=1 HTTP/1.1\r\nHost: g\r\n{AUTH_LINE}\r\n".encode(),            # awaiting the answer
)


async def drop(port: int, context: ssl.SSLContext, hello: bytes, kind: int) -> None:
    if kind == 0:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello[: len(hello) // 2])
    else:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        writer.write(DROPPED_AT[kind])
    await writer.drain()
    await asyncio.sleep(0.005 * (kind == 3))  # long enough for the request to reach the cluster
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    writer.transport.abort()


async def drop_many(port: int, context: ssl.SSLContext, count: int) -> None:
    hello = client_hello(context)
    next_kind = iter(range(count))

    async def worker() -> None:
        for i in next_kind:
            await drop(port, context, hello, i % len(DROPPED_AT))
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def settle(pid: int, fd_bound: int, seconds: float = RESPONSE_HEADER_TIMEOUT + 15) -> int:
    """The gateway's fd count once it is at most `fd_bound` (or the last seen after `seconds`)."""
    deadline = time.monotonic() + seconds
    while (count := fds(pid)) > fd_bound and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_10000_clients_dropped_abruptly_leave_no_descriptors_or_memory_behind(gateway, tls_files):
    pid, context = gateway.popen.pid, client_context(tls_files)
    start_fds, start_rss = fds(pid), rss(pid)
    figures = []  # (descriptors, RSS) once each round's connections have gone
    began = time.monotonic()
    for _ in range(ROUNDS):
        asyncio.run(drop_many(gateway.port, context, DROPS // ROUNDS))
        figures.append((settle(pid, start_fds + POOL_IDLE), rss(pid)))
    took = time.monotonic() - began
    rss_figures = [round(r / 2**20, 1) for _, r in figures]
    print(f"{DROPS} dropped in {ROUNDS} rounds, {took:.1f}s: descriptors {start_fds} at start, then "
          f"{[f for f, _ in figures]}; RSS MiB {start_rss / 2**20:.1f} at start, then {rss_figures}")
    # What may stay: the pool's idle connections, dialled for clients that then left.
    assert all(count <= start_fds + POOL_IDLE for count, _ in figures)
    assert "Traceback" not in gateway.log.read_text()
    # Memory: each round piles up a few hundred connections at once (those whose reset is not
    # seen, until their deadlines) and the allocator keeps the high water. The first round sets
    # it (+7 to +12 MiB); later rounds stay within 0.2 MiB of it but for one step of up to
    # 8.6 MiB in some runs, about the free heap top glibc may keep below its trim threshold
    # (8 MiB, server.tune_malloc). The bound is that plus 1 KiB per connection. Before closed
    # connections were freed by reference count, RSS rose by 29 MiB in the first round and by
    # 35 MiB after it.
    growth = figures[-1][1] - figures[0][1]
    assert growth < RSS_ROUNDS_BOUND, (
        f"RSS grew by {growth / 2**20:.1f} MiB over the last {DROPS - DROPS // ROUNDS} connections: {rss_figures} MiB")


@pytest.fixture
def patient_gateway(gateway_config, tmp_path):
    """A gateway that would wait long for the cluster's answer: a reset must be noticed by itself."""
    source, text = gateway_config
    for name in ("token", "key"):
        (tmp_path / name).write_text((source / name).read_text())
    process = start_gateway(text.replace("response_header_timeout = 3\n", "response_header_timeout = 30\n"
                                         f"        max_idle_connections = {POOL_IDLE}\n"), tmp_path)
    yield process
    process.stop()


def test_a_client_reset_mid_upload_releases_its_descriptors_within_two_seconds(patient_gateway, tls_files):
    pid, context = patient_gateway.popen.pid, client_context(tls_files)
    start_fds = fds(pid)

    async def resets() -> None:
        hello = client_hello(context)
        # Uploads reset right after their first bytes: some of these resets no poll reports
        # (without the sweep's check, 11-83 descriptors stayed in 2 of 3 runs, until the 30 s deadline).
        await asyncio.gather(*(drop(patient_gateway.port, context, hello, 2) for _ in range(RESET_UPLOADS)))
    asyncio.run(resets())
    began = time.monotonic()
    left = settle(pid, start_fds + POOL_IDLE, seconds=2)
    print(f"{RESET_UPLOADS} uploads reset: descriptors {start_fds} before, {left} after {time.monotonic() - began:.1f}s")
    assert left <= start_fds + POOL_IDLE, f"{left - start_fds} descriptors still held 2 s after the resets"


# --- the soak ------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert length, head
    await reader.readexactly(int(length[0].split(b":")[1]))
    return int(head[9:12])


async def soak(port: int, context: ssl.SSLContext, seconds: float, counts: dict[str, int]) -> None:
    end = time.monotonic() + seconds

    async def connect():
        return await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1",
                                             limit=2**20)

    async def gets() -> None:
        reader, writer = await connect()
        while time.monotonic() < end:
            writer.write(f"GET {BASE}/echo HTTP/1.1\r\nHost: g\r\n{AUTH_LINE}\r\n".encode())
            assert await read_response(reader) == 200
            counts["get"] += 1
        writer.close()

    async def lists() -> None:
        while time.monotonic() < end:  # a fresh connection each time: the client side churns too
            reader, writer = await connect()
            writer.write(f"GET {BASE}/big?size=2000000 HTTP/1.1\r\nHost: g\r\n{AUTH_LINE}\r\n".encode())
            assert await read_response(reader) == 200
            counts["list"] += 1
            writer.close()

    async def watches() -> None:
        while time.monotonic() < end:
            reader, writer = await connect()
            writer.write(f"GET {BASE}/api/v1/pods?watch=1&serve=watch&interval=0.02 HTTP/1.1\r\n"
                         f"Host: g\r\n{AUTH_LINE}\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            for _ in range(20):
                await reader.readuntil(b"\n")  # events arrive...
            writer.transport.abort()  # ...until the client goes away
            counts["watch"] += 1

    async def execs() -> None:
        while time.monotonic() < end:
            reader, writer = await connect()
            writer.write(f"POST {BASE}/upgrade HTTP/1.1\r\nHost: g\r\n{AUTH_LINE}Connection: Upgrade\r\n"
                         "Upgrade: SPDY/3.1\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            assert await reader.readuntil(b"\n") == b"hello from upstream\n"
            writer.write(b"ls -l\n")
            assert await reader.readuntil(b"\n") == b"LS -L\n"
            writer.close()
            counts["exec"] += 1
    await asyncio.gather(*(gets() for _ in range(3)), lists(), *(watches() for _ in range(2)), execs())  # SOAK_CLIENTS


def trend(samples: list[tuple[float, int]]) -> float:
    """The least-squares slope of (time, value) samples, per second."""
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    return (sum((t - mean_t) * (v - mean_v) for t, v in samples)
            / sum((t - mean_t) ** 2 for t, _ in samples))


def test_a_mixed_soak_shows_no_growth_in_memory_or_descriptors(gateway, tls_files):
    pid, context = gateway.popen.pid, client_context(tls_files)
    counts = dict.fromkeys(("get", "list", "watch", "exec"), 0)
    samples: list[tuple[float, int, int]] = []

    async def run() -> None:
        work = asyncio.ensure_future(soak(gateway.port, context, SOAK_SECONDS, counts))
        began = time.monotonic()
        while not work.done():
            samples.append((time.monotonic() - began, rss(pid), fds(pid)))
            await asyncio.wait([work], timeout=1.0)
        work.result()
    base_fds = fds(pid)
    asyncio.run(run())
    steady = samples[len(samples) // 3:]  # after the warm-up third
    rss_slope = trend([(t, r) for t, r, _ in steady])
    fd_slope = trend([(t, f) for t, _, f in steady])
    after_fds = settle(pid, base_fds)
    print("RSS MiB by 5 s:", [round(r / 2**20, 1) for _, r, _ in samples[::5]])
    print(f"soak {SOAK_SECONDS:g}s, {counts}: RSS {samples[0][1] / 2**20:.1f} -> {samples[-1][1] / 2**20:.1f} MiB "
          f"(steady slope {rss_slope / 1024:.1f} KiB/s), fds {min(f for *_, f in steady)}-{max(f for *_, f in steady)} "
          f"(slope {fd_slope:.3f}/s), after {after_fds} (before {base_fds})")
    assert all(counts.values()), counts
    steady_seconds = steady[-1][0] - steady[0][0]
    assert fd_slope * steady_seconds < 8, fd_slope  # no descriptor trend while the soak runs...
    assert after_fds <= base_fds + SOAK_CLIENTS  # ...and none left once it is over but the pool's idle ones
    assert rss_slope < RSS_SLOPE_BOUND, (
        f"RSS grows by {rss_slope / 1024:.0f} KiB/s over the soak's last {steady_seconds:.0f}s "
        f"(bound {RSS_SLOPE_BOUND // 1024} KiB/s): {[round(r / 2**20, 1) for _, r, _ in steady]} MiB")
