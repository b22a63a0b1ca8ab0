"""What each open client connection is busy with, and the order a drain ends them in.

A drain (SIGTERM) stops accepting, lets requests in flight finish, ends watches one after
another spread over `[server] watch_termination_period` (so that thousands of clients do not
relist at the same instant, as the API server's --shutdown-watch-termination-grace-period
spreads them), then closes tunnels (exec, attach, port-forward).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable

from .client import ClientConnection
from .exchange import AWAITING_HEAD
from .lifecycle import Census
from .local import LocalResponder
from .proxy import ProxyExchange
from .watchstream import WatchSubscriber


class Busy(enum.Enum):
    IDLE = "idle"        # between requests: closed at once
    REQUEST = "request"  # a request in flight, or a new connection's first: it may finish
    WATCH = "watch"      # a watch or followed log (proxied or the gateway's own): ended in turn
    TUNNEL = "tunnel"    # an upgraded stream: closed once the watches have ended


def busy(conn: ClientConnection) -> Busy:
    responder = conn.active
    if responder is None:
        # A connection still awaiting its first request head (or one begun) is about to send a
        # request: it gets its header_timeout, as a request in flight.
        return Busy.REQUEST if conn.parsing_head or conn.deadline_kind == AWAITING_HEAD else Busy.IDLE
    if responder.tunnel or responder.upgrade:
        return Busy.TUNNEL
    if (isinstance(responder, ProxyExchange) and responder.plan.long_running) or \
            (isinstance(responder, LocalResponder) and responder.streaming) or isinstance(responder, WatchSubscriber):
        return Busy.WATCH
    return Busy.REQUEST


def census(connections: Iterable[ClientConnection]) -> Census:
    counted = Census()
    for conn in connections:
        counted.connections += 1
        if busy(conn) is Busy.WATCH:
            counted.watches += 1
    return counted


def watch_end_offsets(count: int, period: float) -> list[float]:
    """Seconds after the drain begins at which each of `count` watches ends: evenly spread, the
    last at `period` (0: all at once)."""
    return [period * (i + 1) / count for i in range(count)]
