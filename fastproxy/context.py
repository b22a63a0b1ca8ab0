"""The request context: one record per request, built once, read by handlers and observers.

Like Envoy's per-stream record: the connection fills it in as the request goes (route, identity,
status, bytes, times), and every observer (metrics, audit, activity, access log) reads the same
record at the request's start and finish. Request info is derived from the route on first use and
kept, so the scope check and the audit log read one computation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .auth.requestinfo import RequestInfo, request_info

if TYPE_CHECKING:
    from .auth.identity import Identity
    from .routing import Route


@dataclass(slots=True)
class RequestHead:
    """A parsed client request head, as plain data."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    client_ip: bytes
    upgrade: bool = False


class RequestContext:
    """What one request was and what became of it."""

    __slots__ = (
        "head", "started", "route", "identity", "status", "bytes_in", "bytes_out",
        "first_byte", "ended", "message", "_info",
    )

    def __init__(self, head: RequestHead, started: float):
        self.head = head
        self.started = started          # time.monotonic() when the head was parsed (times are
                                        # taken only while an observer is configured)
        self.route: Route | None = None  # None: refused before routing (bad path, bad HTTP)
        self.identity: Identity | None = None
        self.status = 0                 # the status code the client got (101 for tunnels)
        self.bytes_in = 0               # request body bytes (tunnel bytes after an upgrade)
        self.bytes_out = 0              # response bytes written to the client, head included
        self.first_byte = 0.0           # time.monotonic() of the upstream's first response byte
        self.ended = 0.0                # time.monotonic() when the response ended or the client left
        self.message = ""               # why the gateway refused or failed it
        self._info: RequestInfo | None = None

    @property
    def method(self) -> str:
        return self.head.method.decode("latin-1")

    @property
    def info(self) -> RequestInfo | None:
        """Verb, API group, resource, subresource, namespace and name, as the API server derives them."""
        if self._info is None and self.route is not None:
            self._info = request_info(self.method, self.route.path, self.route.query)
        return self._info


class Observer(Protocol):
    """Told of every request exactly once at its start and once at its finish."""

    def start(self, ctx: RequestContext) -> None: ...

    def finish(self, ctx: RequestContext) -> None: ...


class Observers:
    """The configured observers; with none, `active` is False and the connection calls nothing.

    `start` and `finish` are set to the lone observer's own methods when there is one, so the
    common case costs one call per event rather than a loop."""

    __slots__ = ("observers", "active", "start", "finish")

    def __init__(self, observers: Sequence[Observer] = ()):
        self.observers: tuple[Observer, ...] = ()
        self._set(tuple(observers))

    def add(self, observer: Observer) -> None:
        self._set((*self.observers, observer))

    def remove(self, observer: Observer) -> None:
        self._set(tuple(o for o in self.observers if o is not observer))

    def _set(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers
        self.active = bool(observers)
        if len(observers) == 1:
            self.start, self.finish = observers[0].start, observers[0].finish
        else:
            self.start, self.finish = self._start_each, self._finish_each

    def _start_each(self, ctx: RequestContext) -> None:
        for observer in self.observers:
            observer.start(ctx)

    def _finish_each(self, ctx: RequestContext) -> None:
        for observer in self.observers:
            observer.finish(ctx)
