"""Listening sockets, worker processes, the event loop and signals."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence

import uvloop

from .auth.credentials import Authenticator
from .client import ClientConnection
from .config import Config, ServerConfig
from .context import Observer
from .gateway import Gateway
from .observe import metrics
from .status import status_response
from .tlssocket import TLSListener

log = logging.getLogger("fastproxy")

SWEEP_INTERVAL = 1.0


def server_ssl_context(server: ServerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def listening_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # workers share the port
    sock.bind((host, port))
    if listen:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


def tune_malloc() -> None:
    """Keep large short-lived buffers (TLS reads of a full record, big response chunks) on the heap.

    Above glibc's default (sliding) mmap threshold such an allocation costs an mmap/munmap pair
    each time; a fixed threshold of 1 MiB (and a trim threshold that does not hand the heap top
    back after each read) makes them ordinary heap allocations.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 8 << 20)


def raise_file_limit() -> None:
    """Every watch holds two sockets; the default soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Worker:
    """One process: an event loop serving every client connection it accepts."""

    def __init__(self, config: Config, sock: socket.socket, observers: Sequence[Observer] = (), *,
                 handle_signals: bool = True, metrics_share: str | None = None):
        self.config = config
        self.sock = sock
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.gateway = Gateway(config, self.loop, observers, metrics_share)
        self.handle_signals = handle_signals  # off when embedded in another program's thread
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        """From any thread: stop accepting and drain, as SIGTERM does."""
        self.loop.call_soon_threadsafe(self.stopping.set)

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.gateway.close()
            # Let the background tasks the gateway cancelled (probes, reviews) finish cancelling.
            pending = asyncio.all_tasks(self.loop)
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def _serve(self) -> None:
        server_config = self.config.server
        context = server_ssl_context(server_config) if server_config.tls else None
        if self.handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(signum, self.stopping.set)
        def connection() -> ClientConnection:
            return ClientConnection(self.gateway)
        if context is None:
            server = await self.loop.create_server(connection, sock=self.sock, backlog=4096)
        else:
            # A client gets the request-head timeout to finish its handshake as well.
            server = TLSListener(self.loop, self.sock, context, connection, server_config.header_timeout,
                                 status_response(400, "this port speaks HTTPS; the client sent plain HTTP", close=True))
        self.gateway.start()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        await self.stopping.wait()
        server.close()
        await self._drain(server_config.shutdown_grace)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self.gateway.connections if c.deadline and c.deadline <= now]:
            conn.deadline_passed()
        self.gateway.tick()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _drain(self, grace: float) -> None:
        """Stop taking requests; let the ones in flight finish for up to `grace` seconds."""
        deadline = self.loop.time() + grace
        while self.gateway.connections and self.loop.time() < deadline:
            for conn in list(self.gateway.connections):
                if conn.active is None and not conn.parsing_head:
                    conn.transport.close()
            await asyncio.sleep(0.1)
        for conn in list(self.gateway.connections):
            conn.transport.abort()


def serve(config: Config) -> int:
    raise_file_limit()
    tune_malloc()
    server = config.server
    scheme = "https" if server.tls else "http"
    if not server.tls:
        log.warning("no tls_cert_file/tls_key_file: serving plain HTTP; access keys cross the network in clear text")
    for cluster in config.clusters:
        if cluster.scheme == "http":
            log.warning("cluster %s: plain http:// upstream; its credential crosses the network in clear text", cluster.name)
        if cluster.insecure_skip_tls_verify:
            log.warning("cluster %s: insecure_skip_tls_verify: the cluster's identity is not checked", cluster.name)
    # Open the state store and the signing keys once here, so that a problem with them is one
    # line and exit status 2 instead of workers failing one after another.
    Authenticator(config).close()
    if server.workers == 1:
        sock = listening_socket(server.host, server.port)
        log.info("listening on %s://%s:%d (1 worker, pid %d)", scheme, server.host, sock.getsockname()[1], os.getpid())
        Worker(config, sock).run()
        return 0
    # Reserve the port (and learn it, for port 0) without listening: only workers accept.
    reserved = listening_socket(server.host, server.port, listen=False)
    port = reserved.getsockname()[1]
    log.info("listening on %s://%s:%d (%d workers)", scheme, server.host, port, server.workers)
    # Where the workers add up their metrics, so that a scrape reaching any of them sees all.
    share = metrics.share_folder() if config.metrics.enabled else None
    try:
        return _supervise(config, port, reserved, share)
    finally:
        if share is not None:
            metrics.remove_share(share)


def _start_worker(config: Config, port: int, metrics_share: str | None) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            Worker(config, listening_socket(config.server.host, port), metrics_share=metrics_share).run()
            code = 0
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def _supervise(config: Config, port: int, reserved: socket.socket, metrics_share: str | None) -> int:
    """Keep N workers running; forward SIGTERM/SIGINT to them and wait for their drain."""
    workers = {_start_worker(config, port, metrics_share) for _ in range(config.server.workers)}
    reserved.close()
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    recent_failures: list[float] = []
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        workers.discard(pid)
        if metrics_share is not None:
            metrics.retire_worker(metrics_share, pid)  # its counters stay in the sum, its gauges leave it
        if stopping:
            continue
        log.error("worker %d exited (status %d); starting another", pid, os.waitstatus_to_exitcode(status))
        now = time.monotonic()
        recent_failures = [t for t in recent_failures if now - t < 10] + [now]
        if len(recent_failures) > 5 * config.server.workers:
            log.error("workers keep failing; giving up")
            stop(None, None)
            continue
        workers.add(_start_worker(config, port, metrics_share))
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
