"""Shared upstream watch streams, the pure part: which watches may share, and what a joiner needs.

Watches of one cluster, by one identity, on one path and query (apart from the per-client
`resourceVersion`, `timeoutSeconds` and `allowWatchBookmarks`) are served from one upstream
stream. Where a cluster shares across identities, the stream runs as the gateway itself and
every joiner needs the cluster's word (a SubjectAccessReview) that it may watch and list there.
`WatchMemory` keeps what a joiner needs so that it sees neither a gap nor a duplicate: the
current objects, when the stream began with the full set (no resourceVersion, or "0": the API
server then sends every object as ADDED first), and a bounded window of recent events after a
point the stream is known to be complete up to. A joiner the memory cannot serve exactly gets
an upstream stream of its own. Resource versions are ordered only when they are decimal (the
API server's are etcd revisions); any other version is served by a stream of its own.
The sockets are in watchstream.py.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import orjson

from .auth.impersonation import Check
from .status import StatusError, forbidden
from .upstream_client import UpstreamRequestError

if TYPE_CHECKING:
    from .auth.requestinfo import RequestInfo

PER_CLIENT_PARAMS = frozenset(("resourceVersion", "timeoutSeconds", "allowWatchBookmarks"))
WINDOW_EVENTS = 1000  # recent events kept for joiners that resume from a resourceVersion
_TRUE = ("1", "true")
# The identity part of the key of a stream sent with no Impersonate-* lines: as the gateway itself.
AS_GATEWAY = b""
# What a joiner of a stream run as the gateway must be allowed: the stream's first events are
# the list's objects, then the watch's.
JOINER_VERBS = ("watch", "list")


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """A client's watch as sharing sees it: `key` names the streams it may share."""

    key: tuple[str, bytes, str, str]  # cluster, identity lines, path, shared query
    path: str
    shared_query: str                 # the query less the per-client parameters
    resource_version: str             # "" when the client gave none
    timeout: int                      # seconds; 0: as long as the upstream stream lasts
    bookmarks: bool


def shareable_watch(cluster: str, identity_lines: bytes, target: str, accept: bytes | None,
                    version: bytes) -> WatchRequest | None:
    """The watch `target` (path and query, as sent upstream) as a WatchRequest, or None when it
    must keep a stream of its own: not a JSON watch (protobuf, a Table), HTTP/1.0 (no chunks),
    or a per-client parameter the gateway would have to interpret and cannot."""
    if version != b"1.1" or (accept is not None and accept.strip() not in (b"application/json", b"*/*")):
        return None
    path, _, query = target.partition("?")
    shared: list[tuple[str, str]] = []
    rv, timeout, bookmarks, watching = "", 0, False, False
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "resourceVersion":
            rv = value
        elif name == "timeoutSeconds":
            if not value.isdigit():
                return None  # the upstream's to refuse
            timeout = int(value)
        elif name == "allowWatchBookmarks":
            bookmarks = value.lower() in _TRUE
        else:
            if name == "watch":
                watching = value.lower() in _TRUE
            shared.append((name, value))
    if not watching or (rv not in ("", "0") and not rv.isdigit()):
        return None
    shared_query = urlencode(sorted(shared))
    return WatchRequest((cluster, identity_lines, path, shared_query), path, shared_query, rv, timeout, bookmarks)


def stream_identity(across_identities: bool, identity_lines: bytes,
                    info: RequestInfo | None) -> tuple[bytes, tuple[Check, ...]]:
    """Whom the shared stream of a watch runs as (the identity part of its key, the Impersonate-*
    lines sent) and what each joiner must be allowed first. Across identities the stream runs as
    the gateway, for a resource watch whose permission a review can name; any other watch keeps
    its own identity and needs no review."""
    if not across_identities or info is None or not info.is_resource_request or info.verb != "watch" \
            or not info.resource or info.subresource:
        return identity_lines, ()
    return AS_GATEWAY, tuple(Check(info.api_group, info.resource, "", info.namespace, info.name, verb=verb)
                             for verb in JOINER_VERBS)


def joiner_refusal(user: str, checks: tuple[Check, ...], outcomes: list[tuple[bool, str] | BaseException],
                   cluster: str) -> StatusError | None:
    """None when every review allowed `user` what `checks` name; else the Status to refuse the
    joiner with, worded as the API server words it. A review that got no answer refuses too."""
    for check, outcome in zip(checks, outcomes):
        if isinstance(outcome, BaseException):
            code = outcome.code if isinstance(outcome, UpstreamRequestError) else 403
            message = outcome.message if isinstance(outcome, UpstreamRequestError) else str(outcome)
            return StatusError(code, f"whether user {user!r} may {check.verb} {check.resource} cannot be checked "
                                     f"on cluster {cluster!r}: {message}")
        allowed, reason = outcome
        if not allowed:
            return forbidden(user, check.verb, check.resource, check.group, check.namespace, check.name, reason)
    return None


def review_outcome(outcomes: list[tuple[bool, str] | BaseException]) -> str:
    """How a joiner's reviews ended, as the metrics count them: allowed, refused, or failed (some
    review got no answer; the joiner is refused all the same)."""
    allowed = True
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            return "failed"
        allowed = allowed and outcome[0]
    return "allowed" if allowed else "refused"


def upstream_target(request: WatchRequest) -> str:
    """What the shared stream asks the cluster: the client's watch from its resourceVersion,
    with bookmarks always (they tell the gateway up to where the stream is complete)."""
    params = request.shared_query + "&allowWatchBookmarks=true"
    if request.resource_version not in ("", "0"):
        params += "&resourceVersion=" + request.resource_version
    return request.path + "?" + params


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"
    OTHER = "OTHER"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    chunk: bytes       # the event line as one HTTP chunk, written as is to every subscriber
    version: int | None
    name: str          # NAMESPACE/NAME of the object ("" for BOOKMARK and ERROR)
    obj: Any


def parse_event(line: bytes) -> Event:
    """One line of a JSON watch stream as the gateway keeps it (ValueError if not an event)."""
    doc = orjson.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("object"), dict):
        raise ValueError("watch event without an object")
    try:
        kind = EventType(doc.get("type"))
    except ValueError:
        kind = EventType.OTHER
    obj = doc["object"]
    meta = obj.get("metadata") if kind is not EventType.ERROR else None
    meta = meta if isinstance(meta, dict) else {}
    raw_rv = meta.get("resourceVersion")
    version = int(raw_rv) if isinstance(raw_rv, str) and raw_rv.isdigit() else None
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}" if kind not in (EventType.BOOKMARK,
                                                                                 EventType.ERROR) else ""
    return Event(kind, b"%x\r\n%s\r\n" % (len(line), line), version, name, obj)


def added_chunk(obj: Any) -> bytes:
    """An object as the ADDED event the API server sends it in a watch's initial burst."""
    line = orjson.dumps({"type": "ADDED", "object": obj}) + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


class WatchMemory:
    """What one shared stream remembers for joiners; plain data, fed every upstream event."""

    def __init__(self, start_version: str, window: int = WINDOW_EVENTS):
        # A stream begun without a version carries every object; one begun at a version is
        # complete from that version on.
        self.objects: dict[str, Any] | None = {} if start_version in ("", "0") else None
        self.floor: int | None = None if self.objects is not None else int(start_version)
        self.latest = self.floor      # the stream is complete up to here
        self.window: deque[Event] = deque()
        self.window_limit = window
        self.failed = False           # an ERROR came: the stream ends, nobody may join
        # The ERROR chunk when the cluster's first answer to the start version was 410 Gone: that
        # version stays too old, so a joiner asking for it later gets the same answer.
        self.gone: bytes | None = None

    def record(self, event: Event) -> None:
        kind = event.type
        if kind is EventType.ERROR:
            self.failed = True
            if self.objects is None and not self.window and event.obj.get("code") == 410:
                self.gone = event.chunk
            return
        if self.objects is not None:
            if kind is EventType.DELETED:
                self.objects.pop(event.name, None)
            elif kind in (EventType.ADDED, EventType.MODIFIED):
                self.objects[event.name] = event.obj
        if event.version is None:
            return
        if self.floor is None:
            if kind is not EventType.BOOKMARK:
                return  # still in the initial burst, whose versions are not in order
            self.floor = event.version  # every change up to the bookmark has been sent
        elif event.version <= (self.latest or 0):
            return  # never seen from an API server; never let it reorder the window
        self.latest = event.version
        self.window.append(event)
        if len(self.window) > self.window_limit:
            dropped = self.window.popleft()
            self.floor = dropped.version

    def catch_up(self, version: str, bookmarks: bool) -> list[bytes] | None:
        """The chunks a joiner at `version` must get before the live events, or None when this
        stream cannot serve it exactly (it then needs a stream of its own)."""
        if self.failed:
            return None
        if version in ("", "0"):
            if self.objects is None:
                return None
            return [added_chunk(obj) for obj in self.objects.values()]
        if not version.isdigit() or self.floor is None or self.latest is None:
            return None
        wanted = int(version)
        if not self.floor <= wanted <= self.latest:
            return None
        return [event.chunk for event in self.window
                if event.version is not None and event.version > wanted
                and (bookmarks or event.type is not EventType.BOOKMARK)]
