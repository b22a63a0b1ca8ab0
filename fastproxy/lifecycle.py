"""What the service manager hears: readiness, reloads, drain, status lines and watchdog pings.

The main process alone talks to systemd (`NotifyAccess=main`). With one worker that is the
worker itself. With several, each worker reports to the supervisor on a pipe it inherits
(`listening`, `alive` once a second from its event loop, `reloaded`), and the supervisor
speaks for all of them: READY=1 once every worker listens, WATCHDOG=1 only while every worker's
loop has reported lately, so one blocked loop silences the pings and systemd restarts the
service. One speaker keeps NotifyAccess narrow and sees the set of workers as it changes
(a worker being replaced, a reload half done), which per-worker pings could not express.
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field

from . import sdnotify

log = logging.getLogger("fastproxy")


class Phase(enum.Enum):
    STARTING = "starting"    # not every worker listens yet
    SERVING = "serving"
    RELOADING = "reloading"  # SIGHUP taken, not every worker has the new configuration yet
    DRAINING = "draining"    # SIGTERM taken: no new connections, open ones are ending


@dataclass
class Census:
    """One worker's open client connections, and the watches and tunnels among them."""

    connections: int = 0
    watches: int = 0


class Reporter:
    """What a worker tells the main process; the base tells nobody (a worker in a test's thread)."""

    wants_census = False  # whether `alive` needs the worker's connections counted

    def listening(self) -> None: ...

    def alive(self, census: Census | None) -> None: ...

    def reloading(self) -> None: ...

    def reloaded(self) -> None: ...

    def stopping(self) -> None: ...


class DirectReporter(Reporter):
    """The worker is the main process: it announces itself and notifies systemd directly."""

    def __init__(self, announcement: str, notifier: sdnotify.Notifier | None):
        self.announcement = announcement
        self.notifier = notifier
        self.watchdog = sdnotify.watchdog_interval(dict(os.environ), os.getpid()) if notifier else None
        self.wants_census = notifier is not None
        self.status = ""

    def listening(self) -> None:
        log.info("%s", self.announcement)
        self._send(sdnotify.message(READY=1))

    def alive(self, census: Census | None) -> None:
        fields: dict[str, object] = {"WATCHDOG": 1} if self.watchdog else {}
        if census is not None:
            status = sdnotify.status_text(1, census.connections, census.watches)
            if status != self.status:
                self.status = fields["STATUS"] = status
        if fields:
            self._send(sdnotify.message(**fields))

    def reloading(self) -> None:
        self._send(sdnotify.reloading_message())

    def reloaded(self) -> None:
        self._send(sdnotify.message(READY=1))

    def stopping(self) -> None:
        self._send(sdnotify.message(STOPPING=1))

    def _send(self, data: bytes) -> None:
        if self.notifier is not None:
            self.notifier.send(data)


class PipeReporter(Reporter):
    """A worker among several: one line per report on the pipe the supervisor reads (each
    write is far below PIPE_BUF, so the workers' lines never interleave)."""

    def __init__(self, fd: int, wants_census: bool):
        self.fd = fd
        self.wants_census = wants_census
        self.pid = os.getpid()

    def listening(self) -> None:
        self._write("listening")

    def alive(self, census: Census | None) -> None:
        self._write("alive" if census is None else f"alive {census.connections} {census.watches}")

    def reloaded(self) -> None:
        self._write("reloaded")

    def _write(self, line: str) -> None:
        try:
            os.write(self.fd, f"{self.pid} {line}\n".encode())
        except OSError:
            pass  # the supervisor is gone: the worker is being stopped anyway


@dataclass
class WorkerState:
    """What the supervisor has heard from one worker."""

    started: float
    last_alive: float
    listening: bool = False
    reloaded: bool = True
    census: Census = field(default_factory=Census)


class Fleet:
    """The supervisor's view of its workers: pure bookkeeping over their reports."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.workers: dict[int, WorkerState] = {}

    def started(self, pid: int, now: float) -> None:
        self.workers[pid] = WorkerState(started=now, last_alive=now)

    def exited(self, pid: int) -> None:
        self.workers.pop(pid, None)

    def record(self, line: str, now: float) -> None:
        """One report line from the pipe: "PID listening", "PID alive [CONNECTIONS WATCHES]", "PID reloaded"."""
        words = line.split()
        if len(words) < 2 or not words[0].isdigit() or int(words[0]) not in self.workers:
            return  # a worker already reaped, or garbage: nothing to learn
        worker, event = self.workers[int(words[0])], words[1]
        if event == "listening":
            worker.listening = True
            worker.last_alive = now
        elif event == "alive":
            worker.last_alive = now
            if len(words) == 4 and words[2].isdigit() and words[3].isdigit():
                worker.census = Census(int(words[2]), int(words[3]))
        elif event == "reloaded":
            worker.reloaded = True

    def begin_reload(self) -> None:
        self.phase = Phase.RELOADING
        for worker in self.workers.values():
            worker.reloaded = not worker.listening  # one still starting takes no SIGHUP: not waited for

    def settle(self) -> bool:
        """Move STARTING or RELOADING on to SERVING once every worker is there; True when it did."""
        workers = self.workers.values()
        if not workers:
            return False
        if (self.phase is Phase.STARTING and all(w.listening for w in workers)) or \
                (self.phase is Phase.RELOADING and all(w.reloaded for w in workers)):
            self.phase = Phase.SERVING
            return True
        return False

    def all_live(self, now: float, stale_after: float) -> bool:
        """Every worker's event loop has reported within `stale_after` seconds."""
        return bool(self.workers) and all(now - w.last_alive <= stale_after for w in self.workers.values())

    def status(self) -> str:
        censuses = [w.census for w in self.workers.values()]
        return sdnotify.status_text(len(censuses), sum(c.connections for c in censuses), sum(c.watches for c in censuses))


class SupervisorNotifier:
    """The supervisor's notifications, decided from the Fleet each time round its loop."""

    def __init__(self, notifier: sdnotify.Notifier | None, watchdog: float | None):
        self.notifier = notifier
        self.watchdog = watchdog
        self.last_ping = 0.0
        self.status = ""

    def update(self, fleet: Fleet, now: float) -> None:
        if self.notifier is None:
            return
        fields: dict[str, object] = {}
        # Ping four times per WatchdogSec while every loop reported within half of it.
        if self.watchdog and now - self.last_ping >= self.watchdog / 4 and fleet.all_live(now, self.watchdog / 2):
            fields["WATCHDOG"] = 1
            self.last_ping = now
        status = fleet.status()
        if status != self.status:
            self.status = fields["STATUS"] = status
        if fields:
            self.notifier.send(sdnotify.message(**fields))

    def send(self, data: bytes) -> None:
        if self.notifier is not None:
            self.notifier.send(data)
