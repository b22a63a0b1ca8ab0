"""The request context: one record per request, built once, read by handlers and observers.

Like Envoy's per-stream record: the connection fills it in as the request goes (route, identity,
status, bytes, times), and every observer (metrics, audit, activity, access log) reads the same
record at the request's start and finish. Request info is derived from the route on first use and
kept, so the scope check and the audit log read one computation.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .auth.requestinfo import RequestInfo, request_info

if TYPE_CHECKING:
    from .auth.identity import Identity
    from .headers import ClientHeaders
    from .routing import Route


log = logging.getLogger("fastproxy")


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
        "first_byte", "ended", "message", "id_line", "found", "_info",
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
        self.id_line = b""              # while a log records requests: "X-Request-Id: ID\r\n" (RequestIds)
        self.found: ClientHeaders | None = None  # the handler's scan of the headers, for the audit log
        self._info: RequestInfo | None = None

    @property
    def method(self) -> str:
        return self.head.method.decode("latin-1")

    @property
    def request_id(self) -> str:
        """The id the client is told (X-Request-Id), the access log's and the audit log's; "" without one."""
        return self.id_line[ID_AT:-2].decode("ascii")

    @property
    def info(self) -> RequestInfo | None:
        """Verb, API group, resource, subresource, namespace and name, as the API server derives them."""
        if self._info is None and self.route is not None:
            self._info = request_info(self.method, self.route.path, self.route.query)
        return self._info


REQUEST_ID_HEADER = b"X-Request-Id"
ID_AT = len(REQUEST_ID_HEADER) + 2  # where the id begins in its header line
_LINE = re.compile(rb"[^\n]*\n")


class RequestIds:
    """Request ids, random (version 4) UUIDs, as ready-made `X-Request-Id: ID` header lines (with
    their CRLF) for `RequestContext.id_line`: made 512 at a time by a few calls that each do the
    whole batch (one urandom byte per character, mapped to hex digits; the header name, dashes,
    version, variant and CRLF put in place by slice), so a request takes one with a list pop:
    `ctx.id_line = ids.lines.pop() if ids.lines else ids()`."""

    BATCH = 512
    _DIGITS = bytes(b"0123456789abcdef"[b & 15] for b in range(256))
    _VARIANT = bytes(b"89ab"[b & 3] for b in range(256))

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def __call__(self) -> bytes:
        if not self.lines:
            n = self.BATCH
            size = ID_AT + 38  # "X-Request-Id: " + 36 characters + CRLF
            text = bytearray(os.urandom(size * n)).translate(self._DIGITS)
            for at, byte in enumerate(REQUEST_ID_HEADER + b": "):
                text[at::size] = bytes((byte,)) * n
            uuid = ID_AT  # where each line's UUID begins
            for at in (8, 13, 18, 23):
                text[uuid + at::size] = b"-" * n
            text[uuid + 14::size] = b"4" * n
            text[uuid + 19::size] = text[uuid + 19::size].translate(self._VARIANT)
            text[size - 2::size] = b"\r" * n
            text[size - 1::size] = b"\n" * n
            self.lines = _LINE.findall(text)
        return self.lines.pop()

    def assign(self, ctx: RequestContext) -> None:
        ctx.id_line = self.lines.pop() if self.lines else self()

    def new_id(self) -> bytes:
        """An id (ASCII) for a request that has none (the audit log's, without an access log)."""
        return self()[ID_AT:-2]


class Observer(Protocol):
    """Told of every request exactly once at its start and once at its finish."""

    def start(self, ctx: RequestContext) -> None: ...

    def finish(self, ctx: RequestContext) -> None: ...


class BatchObserver(Protocol):
    """Told of requests in batches (`batched = True`): those begun, then those finished, since the
    last `Observers.flush`; a request begun and finished in between is in both."""

    batched: bool

    def start_batch(self, begun: list[RequestContext]) -> None: ...

    def finish_batch(self, done: list[RequestContext]) -> None: ...


FLUSH_INTERVAL = 0.1  # seconds between the gateway's flushes of the batched observers' requests


class Observers:
    """The configured observers; with none, `active` is False and the connection calls nothing.

    An observer is told at once (`start`, `finish`), or in batches (a BatchObserver): then the
    connection's part is one list append at each end, a C call without a Python frame, and the
    observer's work runs over each batch with C-level maps rather than one Python call per
    request. `flush()` hands the batches over; the gateway calls it every FLUSH_INTERVAL and
    before anything reads what the observers keep (a scrape). `start` and `finish` are the
    appends themselves, or the lone observer's methods, when that is all there is to do."""

    __slots__ = ("observers", "immediate", "batched", "begun", "done", "active", "start", "finish")

    def __init__(self, observers: Sequence[Observer | BatchObserver] = ()):
        self.observers: tuple[Observer | BatchObserver, ...] = ()
        self.begun: list[RequestContext] = []
        self.done: list[RequestContext] = []
        self._set(tuple(observers))

    def add(self, observer: Observer | BatchObserver) -> None:
        self._set((*self.observers, observer))

    def remove(self, observer: Observer | BatchObserver) -> None:
        self._set(tuple(o for o in self.observers if o is not observer))

    def _set(self, observers: tuple[Observer | BatchObserver, ...]) -> None:
        self.flush()
        self.observers = observers
        self.immediate: tuple[Observer, ...] = tuple(o for o in observers if not getattr(o, "batched", False))  # type: ignore[misc]
        self.batched: tuple[BatchObserver, ...] = tuple(o for o in observers if getattr(o, "batched", False))  # type: ignore[misc]
        self.active = bool(observers)
        if not self.immediate:
            self.start, self.finish = self.begun.append, self.done.append
        elif len(self.immediate) == 1 and not self.batched:
            self.start, self.finish = self.immediate[0].start, self.immediate[0].finish
        else:
            self.start, self.finish = self._start_each, self._finish_each

    def _start_each(self, ctx: RequestContext) -> None:
        if self.batched:
            self.begun.append(ctx)
        for observer in self.immediate:
            observer.start(ctx)

    def _finish_each(self, ctx: RequestContext) -> None:
        if self.batched:
            self.done.append(ctx)
        for observer in self.immediate:
            observer.finish(ctx)

    def flush(self) -> None:
        """Hand the batched observers the requests begun and finished since the last flush."""
        if not self.begun and not self.done:
            return
        begun, done = self.begun[:], self.done[:]
        self.begun.clear()  # cleared, not replaced: `start` and `finish` may be their appends
        self.done.clear()
        for observer in self.batched:
            try:
                observer.start_batch(begun)
            except Exception:  # noqa: BLE001 - an observer's fault must not lose the others' batches
                log.exception("observer %s failed", type(observer).__name__)
        for observer in self.batched:
            try:
                observer.finish_batch(done)
            except Exception:  # noqa: BLE001
                log.exception("observer %s failed", type(observer).__name__)
