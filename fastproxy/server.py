"""Listening sockets, worker processes, the event loop and signals."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import resource
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence

import uvloop

from .accepting import Acceptor, PlainListener
from .auth.credentials import Authenticator
from .client import ClientConnection
from .config import Config, ConfigError, ServerConfig, load_config
from .context import Observer
from .drain import Busy, busy, census, watch_end_offsets
from .gateway import Gateway
from .handover import start_successor
from .lifecycle import DirectReporter, Fleet, Phase, PipeReporter, Reporter, SupervisorNotifier
from .local import READY, SHUTDOWN
from .observe import metrics
from .proxy import ProxyExchange
from .reload import reload_refusal, remove_pid_file, write_pid_file
from .sdnotify import Notifier, reloading_message, watchdog_interval
from .sdnotify import message as sdnotify_message
from .status import status_response
from .tlssocket import TLSListener, TLSSocketTransport
from .watchstream import WatchSubscriber

log = logging.getLogger("fastproxy")

SWEEP_INTERVAL = 1.0
SD_LISTEN_FDS_START = 3  # the first socket passed by socket activation


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


def tune_collector() -> None:
    """Keep the cyclic garbage collector off the request path (called once a worker is set up).

    The batched observers hold each request's context until the next flush, so a busy worker's
    allocations outrun its frees: at the default thresholds the collector ran some 180 young and
    1.5 full collections a second, each full one walking every object the worker holds (modules,
    configuration, state snapshot) for ~25 ms: 8% of the worker's CPU with metrics on, and the
    small GET's p99 stalls (`python -m bench.gc_probe`). What exists by then is frozen out of the
    collector's reach, and a young generation of 50,000 objects lets a request's objects die by
    reference counting before a collection sees them.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def refreeze_collector() -> None:
    """After a reload: what the old configuration left is frozen with the rest, where no
    collection would free it; thaw everything, let one full collection take what is garbage now,
    freeze what remains. Only in a worker whose collector was tuned (something is frozen)."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def raise_file_limit() -> None:
    """Every watch holds two sockets; the default soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Worker:
    """One process: an event loop serving every client connection it accepts."""

    def __init__(self, config: Config, sock: socket.socket, observers: Sequence[Observer] = (), *,
                 handle_signals: bool = True, metrics_share: str | None = None, reporter: Reporter | None = None):
        self.config = config
        self.sock = sock
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.gateway = Gateway(config, self.loop, observers, metrics_share)
        self.handle_signals = handle_signals  # off when embedded in another program's thread
        self.reporter = reporter or Reporter()
        self.phase = Phase.STARTING
        self.stopping = asyncio.Event()
        self.listener: Acceptor | asyncio.AbstractServer | None = None
        self.gateway.health.add(READY, SHUTDOWN, lambda: "draining" if self.phase is Phase.DRAINING else None)

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
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        def connection() -> ClientConnection:
            return ClientConnection(self.gateway)
        cap = self.config.limits.connections_per_worker if self.config.limits is not None else 0
        if context is None and cap:
            self.listener = PlainListener(self.loop, self.sock, connection)
        elif context is None:
            self.listener = await self.loop.create_server(connection, sock=self.sock, backlog=4096)
        else:
            # A client gets the request-head timeout to finish its handshake as well.
            self.listener = TLSListener(self.loop, self.sock, context, connection, server_config.header_timeout,
                                        status_response(400, "this port speaks HTTPS; the client sent plain HTTP", close=True))
        if cap and isinstance(self.listener, Acceptor):
            self.listener.room = self._room_below(cap)
        self.gateway.start()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        self.phase = Phase.SERVING
        self.reporter.listening()
        await self.stopping.wait()
        self.phase = Phase.DRAINING
        self.reporter.stopping()
        self.listener.close()
        await self._drain()

    def _room_below(self, cap: int) -> Callable[[], bool]:
        """Whether the worker holds fewer than `cap` client connections (handshakes included)."""
        connections, listener = self.gateway.connections, self.listener
        assert isinstance(listener, Acceptor)
        return lambda: len(connections) + listener.handshakes < cap

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self.gateway.connections if c.deadline]:
            if conn.deadline <= now:
                conn.deadline_passed()
            elif isinstance(conn.transport, TLSSocketTransport):
                # A connection waiting on something: its reset may not have been reported.
                conn.transport.check_reset()
        self.gateway.tick()
        # From the loop itself: a loop that stops running stops these (and the watchdog pings).
        self.reporter.alive(census(self.gateway.connections) if self.reporter.wants_census else None)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def reload(self) -> None:
        """SIGHUP: read the configuration file again; new connections and requests use it, open
        ones keep theirs. A file that fails any check changes nothing."""
        if self.phase is not Phase.SERVING:
            return
        self.reporter.reloading()
        try:
            config = load_config(self.config.path)
            refusal = reload_refusal(self.config, config)
            if refusal is not None:
                raise ConfigError(refusal)
            context = server_ssl_context(config.server) if config.server.tls else None
        except (ConfigError, ssl.SSLError, OSError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
        else:
            self.config = config
            removed = self.gateway.reload(config)
            if context is not None and isinstance(self.listener, TLSListener):
                self.listener.context = context
            if removed:  # their watches end in turn, as in a drain; other requests finish
                self._end_gradually(self._watches(lambda conn: _proxied_cluster(conn) in removed))
            log.info("reloaded %s (%d clusters; %s removed)", config.path, len(config.clusters), ", ".join(removed) or "none")
            refreeze_collector()
        self.reporter.reloaded()

    def _watches(self, which: Callable[[ClientConnection], bool] = lambda conn: True) -> list[ClientConnection]:
        return [conn for conn in self.gateway.connections if busy(conn) is Busy.WATCH and which(conn)]

    def _end_gradually(self, watches: list[ClientConnection]) -> None:
        """End the watches one by one over watch_termination_period: each client sees its stream
        end (FIN after what was sent) and resumes elsewhere or later."""
        period = self.config.server.watch_termination_period
        for conn, offset in zip(watches, watch_end_offsets(len(watches), period)):
            self.loop.call_later(offset, conn.transport.close)

    async def _drain(self) -> None:
        """Requests in flight may finish for shutdown_grace seconds; watches end spread over
        watch_termination_period; then tunnels close; whatever is left then is cut off."""
        server = self.config.server
        start = self.loop.time()
        self._end_gradually(self._watches())
        tunnels_close_at = start + server.watch_termination_period
        deadline = start + max(server.shutdown_grace, server.watch_termination_period)
        while (self.gateway.connections or getattr(self.listener, "handshakes", 0)) and self.loop.time() < deadline:
            for conn in list(self.gateway.connections):
                kind = busy(conn)
                if kind is Busy.IDLE or (kind is not Busy.REQUEST and self.loop.time() >= tunnels_close_at):
                    conn.transport.close()
            await asyncio.sleep(0.05)
        for conn in list(self.gateway.connections):
            conn.transport.abort()


def _proxied_cluster(conn: ClientConnection) -> str | None:
    responder = conn.active
    if isinstance(responder, ProxyExchange):
        return responder.plan.upstream.cluster.name
    if isinstance(responder, WatchSubscriber):  # a shared watch's subscriber
        return responder.upstream.cluster.name
    return None


def inherited_socket(environ: dict[str, str], pid: int) -> socket.socket | None:
    """The listening socket passed by socket activation ($LISTEN_FDS for $LISTEN_PID, from fd 3):
    systemd's fastproxy.socket, or the previous process in a hand-over."""
    if environ.get("LISTEN_PID") != str(pid) or not environ.get("LISTEN_FDS"):
        return None
    if environ["LISTEN_FDS"] != "1":
        raise ConfigError(f"LISTEN_FDS: expected one listening socket, got {environ['LISTEN_FDS']}")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the processes this one starts
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
        raise ConfigError("LISTEN_FDS: the socket passed is not a listening TCP socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def serve(config: Config) -> int:
    raise_file_limit()
    tune_malloc()
    server = config.server
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
    inherited = inherited_socket(dict(os.environ), os.getpid())
    notifier = Notifier.from_environ()
    write_pid_file(config)
    try:
        return _serve(config, inherited, notifier)
    finally:
        remove_pid_file(config)


def _serve(config: Config, inherited: socket.socket | None, notifier: Notifier | None) -> int:
    server = config.server
    scheme = "https" if server.tls else "http"
    if server.workers == 1:
        sock = inherited or listening_socket(server.host, server.port)
        address = sock.getsockname()
        announcement = (f"listening on {scheme}://{address[0]}:{address[1]} (1 worker, pid {os.getpid()}"
                        f"{', socket passed in' if inherited else ''})")
        worker = Worker(config, sock, reporter=DirectReporter(announcement, notifier))
        worker.loop.add_signal_handler(signal.SIGUSR2, start_successor, sock)
        tune_collector()
        worker.run()
        return 0
    # Reserve the port (and learn it, for port 0) without listening: only workers accept; or
    # the workers share the socket passed in.
    reserved = inherited or listening_socket(server.host, server.port, listen=False)
    address = reserved.getsockname()
    announcement = (f"listening on {scheme}://{address[0]}:{address[1]} ({server.workers} workers"
                    f"{', socket passed in' if inherited else ''})")
    # Where the workers add up their metrics, so that a scrape reaching any of them sees all.
    share = metrics.share_folder() if config.metrics.enabled else None
    try:
        return Supervisor(config, reserved, inherited is not None, share, announcement, notifier).run()
    finally:
        if share is not None:
            metrics.remove_share(share)


class Supervisor:
    """Keeps N workers running; relays signals to them and speaks for them to systemd."""

    def __init__(self, config: Config, sock: socket.socket, shared: bool, metrics_share: str | None,
                 announcement: str, notifier: Notifier | None):
        self.config = config
        self.sock = sock
        self.shared = shared  # the workers accept on `sock` itself, rather than each on its own
        self.port = sock.getsockname()[1]
        self.metrics_share = metrics_share
        self.announcement = announcement
        self.fleet = Fleet()
        self.notify = SupervisorNotifier(notifier, watchdog_interval(dict(os.environ), os.getpid()))
        self.reports, self.report_fd = os.pipe()
        self.wakeup, wakeup_fd = os.pipe()
        for fd in (self.reports, self.wakeup, wakeup_fd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wakeup_fd)
        self.signals: list[int] = []

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))
        for _ in range(self.config.server.workers):
            self._start_worker()
        if not self.shared:
            self.sock.close()
        recent_failures: list[float] = []
        pending = b""
        while self.fleet.workers:
            readable, _, _ = select.select([self.reports, self.wakeup], [], [], 0.25)
            if self.wakeup in readable:
                os.read(self.wakeup, 4096)
            if self.reports in readable:
                lines = (pending + os.read(self.reports, 65536)).split(b"\n")
                pending = lines.pop()
                now = time.monotonic()
                for line in lines:
                    self.fleet.record(line.decode("ascii", "replace"), now)
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                elif signum == signal.SIGUSR2:
                    self._hand_over()
                elif signum != signal.SIGCHLD:
                    self._stop()
            for pid, status in self._reap():
                if self.fleet.phase is Phase.DRAINING:
                    continue
                log.error("worker %d exited (status %d); starting another", pid, os.waitstatus_to_exitcode(status))
                now = time.monotonic()
                recent_failures = [t for t in recent_failures if now - t < 10] + [now]
                if len(recent_failures) > 5 * self.config.server.workers:
                    log.error("workers keep failing; giving up")
                    self._stop()
                    continue
                self._start_worker()
            self._settle()
        return 0

    def _settle(self) -> None:
        was = self.fleet.phase
        if self.fleet.settle():
            if was is Phase.STARTING:
                log.info("%s", self.announcement)
            self.notify.send(sdnotify_message(READY=1))
        if self.fleet.phase is not Phase.DRAINING:
            self.notify.update(self.fleet, time.monotonic())

    def _start_worker(self) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop takes it
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the supervisor's business
                os.close(self.reports)
                sock = self.sock if self.shared else listening_socket(self.config.server.host, self.port)
                reporter = PipeReporter(self.report_fd, self.notify.notifier is not None)
                worker = Worker(self.config, sock, metrics_share=self.metrics_share, reporter=reporter)
                tune_collector()
                worker.run()
                code = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        self.fleet.started(pid, time.monotonic())

    def _reap(self) -> list[tuple[int, int]]:
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.fleet.exited(pid)
            if self.metrics_share is not None:
                metrics.retire_worker(self.metrics_share, pid)  # its counters stay in the sum, its gauges leave it
            reaped.append((pid, status))
        return reaped

    def _signal_workers(self, signum: int) -> None:
        for pid in self.fleet.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop(self) -> None:
        if self.fleet.phase is not Phase.DRAINING:
            self.fleet.phase = Phase.DRAINING
            self.notify.send(sdnotify_message(STOPPING=1))
        self._signal_workers(signal.SIGTERM)

    def _hand_over(self) -> None:
        if self.shared:
            start_successor(self.sock)
        else:  # each worker has a socket of its own: no single one to pass on
            log.error("hand-over refused: with workers > 1 it needs the listening socket passed in (fastproxy.socket)")

    def _reload(self) -> None:
        """Check the file here first, so that a bad one is one line, not one per worker."""
        if self.fleet.phase is not Phase.SERVING:
            log.error("reload refused: the gateway is %s", self.fleet.phase.value)
            return
        try:
            config = load_config(self.config.path)
            refusal = reload_refusal(self.config, config)
            if refusal is not None:
                raise ConfigError(refusal)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        self.config = config  # for workers started from now on
        self.notify.send(reloading_message())
        self.fleet.begin_reload()
        self._signal_workers(signal.SIGHUP)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
