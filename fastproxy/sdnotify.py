"""The systemd notify protocol: state lines sent as one datagram to $NOTIFY_SOCKET.

A path starting with "@" is an abstract socket (its first byte NUL). Without $NOTIFY_SOCKET
(not run by systemd, or `Type=exec`) there is no notifier and nothing is sent.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fastproxy.sdnotify")


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as an AF_UNIX address: "@name" is the abstract socket "\\0name"."""
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def message(**fields: object) -> bytes:
    """`READY=1`-style lines, in the order given; a field's value must hold no newline."""
    return "".join(f"{name}={value}\n" for name, value in fields.items()).encode()


def reloading_message() -> bytes:
    """RELOADING=1 with the monotonic time systemd (notify-reload) matches against its own."""
    return message(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def status_text(workers: int, connections: int, watches: int) -> str:
    return f"{workers} worker{'s' if workers != 1 else ''}, {connections} connections, {watches} watches"


def watchdog_interval(environ: dict[str, str], pid: int) -> float | None:
    """Seconds systemd waits for a WATCHDOG=1 ping ($WATCHDOG_USEC), when they are meant for `pid`."""
    usec, owner = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class Notifier:
    """Sends state lines to the service manager; a send that fails is logged (once until one
    succeeds again), never raised."""

    def __init__(self, address: str | bytes):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.failing = False

    @classmethod
    def from_environ(cls) -> Notifier | None:
        value = os.environ.get("NOTIFY_SOCKET")
        return cls(socket_address(value)) if value else None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.address)
        except OSError as exc:
            if not self.failing:
                log.warning("cannot notify the service manager: %s", exc)
            self.failing = True
        else:
            self.failing = False

    def close(self) -> None:
        self.sock.close()
