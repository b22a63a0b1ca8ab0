"""Watches of the management API: the changes one worker has seen, and the streams that follow them.

Every worker learns of changes the same way its access keys do, from the state store's snapshots
(another worker's or the CLI's writes included), so an `EventLog` diffs each new snapshot against
the last and keeps the recent events: a watch that resumes from a `resourceVersion` replays what
came after it, or is told 410 Expired when that version is older than what is kept.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

API_VERSION = "management.loft.sh/v1"
EVENT_HISTORY = 10_000            # events kept for watches that resume
BOOKMARK_INTERVAL = 30.0          # seconds between bookmarks, when a watch asks for them
MAX_BUFFERED_BYTES = 8 * 1024 * 1024  # a watcher this far behind is ended; it relists, as with the API server


@dataclass(frozen=True, slots=True)
class Event:
    version: int          # the snapshot version at which the change was seen
    type: str             # ADDED, MODIFIED or DELETED
    resource: str         # the plural, e.g. "users"
    object: dict[str, Any]


class EventLog:
    """Recent events in version order, and the open watches to tell of new ones."""

    def __init__(self, version: int, capacity: int = EVENT_HISTORY):
        self.events: deque[Event] = deque(maxlen=capacity)
        self.oldest = version     # every event after this version is still held
        self.version = version
        self.watches: set[WatchStream] = set()

    def append(self, events: Iterable[Event], version: int) -> None:
        fresh = list(events)
        for event in fresh:
            if len(self.events) == self.events.maxlen:
                self.oldest = self.events[0].version
            self.events.append(event)
        self.version = version
        if fresh:
            for watch in list(self.watches):
                watch.deliver(fresh)

    def since(self, version: int, resource: str) -> list[Event] | None:
        """The events of `resource` after `version`, or None when some may have been dropped."""
        if version < self.oldest:
            return None
        return [event for event in self.events if event.version > version and event.resource == resource]


class Sender(Protocol):
    """What a watch writes through: the responder's chunked stream (local.LocalResponder)."""

    def send_chunk(self, data: bytes) -> None: ...

    def end_stream(self) -> None: ...

    def buffered(self) -> int: ...


class WatchStream:
    """One open watch: events of one resource that pass `admits`, as JSON lines."""

    def __init__(self, log: EventLog, sender: Sender, resource: str, admits: Callable[[dict[str, Any]], bool],
                 render: Callable[[dict[str, Any]], dict[str, Any]], *, kind: str, bookmarks: bool, timeout: float):
        self.log = log
        self.sender = sender
        self.resource = resource
        self.admits = admits
        self.render = render
        self.kind = kind
        self.bookmarks = bookmarks
        self.ends_at = time.monotonic() + timeout
        self.next_bookmark = time.monotonic() + BOOKMARK_INTERVAL
        self.open = True

    def start(self, initial: Iterable[Event]) -> None:
        self.log.watches.add(self)
        self.deliver(initial)

    def deliver(self, events: Iterable[Event]) -> None:
        if not self.open:
            return
        lines = [self._line(event.type, self.render(event.object)) for event in events
                 if event.resource == self.resource and self.admits(event.object)]
        if lines:
            self.sender.send_chunk(b"".join(lines))
            if self.sender.buffered() > MAX_BUFFERED_BYTES:
                self.stop()

    def error(self, status: dict[str, Any]) -> None:
        """As the API server does for a resourceVersion too old: the stream opens, then says so."""
        self.sender.send_chunk(self._line("ERROR", status))
        self.stop()

    def tick(self, now: float) -> None:
        """Once a second: end the watch when its timeoutSeconds passes, send due bookmarks."""
        if now >= self.ends_at:
            self.stop()
        elif self.bookmarks and now >= self.next_bookmark:
            self.next_bookmark = now + BOOKMARK_INTERVAL
            self.sender.send_chunk(self._line("BOOKMARK", {
                "kind": self.kind, "apiVersion": API_VERSION, "metadata": {"resourceVersion": str(self.log.version)}}))

    def stop(self) -> None:
        if self.open:
            self.open = False
            self.log.watches.discard(self)
            self.sender.end_stream()

    def closed(self) -> None:
        """The client left."""
        self.open = False
        self.log.watches.discard(self)

    @staticmethod
    def _line(kind: str, obj: dict[str, Any]) -> bytes:
        return orjson.dumps({"type": kind, "object": obj}) + b"\n"
