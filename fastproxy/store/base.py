"""The state store's two interfaces, and the snapshot the request path reads instead of the database.

The store has two sides. `StateAdmin` is the management side: the CRUD of users, teams, access
keys and revoked token ids that the CLI (and a future management API) performs. `StateReader`
is the data path's side: workers never query the store per request; they hold a Snapshot (every
usable access key by the SHA-256 digest of its secret, with its Identity built) that the reader
keeps current and hands to its subscribers whenever a newer one is loaded. How it learns of a
change is the backend's business: SQLite polls a generation counter off the event loop; a
watching backend (etcd, say) would push. Either way a snapshot is also reloaded when its
`refresh_at` passes, so that activity-based expiry is seen. The one write the data path makes,
batched last-activity times, goes through the reader too.

`fastproxy.store.open_reader` / `open_admin` pick the backend named by `[state] backend`.
"""
from __future__ import annotations

import asyncio
import hmac
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..auth.identity import HeaderValueError, Identity, check_header_value, identity_header_lines, key_digest
from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, CompiledScope, ScopeError, load_scope
from ..names import DNS_SUBDOMAIN

ACCESS_KEY_TYPES = ("Login", "User", "Other")
BASE_GROUPS = ("system:authenticated", "loft:authenticated")
# Other workers' activity reaches a snapshot only on reload; reload often enough that a key kept
# in use never looks idle past its ttlAfterLastActivity.
ACTIVITY_REFRESH_SECONDS = 60.0



class StoreError(ValueError):
    """A refused store operation; the message is one line naming the bad value."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    username: str = ""
    display_name: str = ""
    email: str = ""
    subject: str = ""
    groups: tuple[str, ...] = ()
    disabled: bool = False
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    members: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class AccessKey:
    name: str
    type: str
    user: str | None
    team: str | None
    digest: bytes = field(repr=False)
    display_name: str = ""
    ttl: int = 0                      # seconds; 0: never expires
    ttl_after_last_activity: bool = False
    disabled: bool = False
    scope: dict[str, Any] | None = None
    created: float = 0.0
    last_activity: float | None = None

    def expires_at(self) -> float:
        if not self.ttl:
            return math.inf
        start = self.created
        if self.ttl_after_last_activity and self.last_activity is not None:
            start = max(start, self.last_activity)
        return start + self.ttl


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    access_key: AccessKey
    identity: Identity
    expires_at: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    loaded_at: float
    refresh_at: float                 # reload by then even if nothing changed (activity ttl)
    keys: Mapping[bytes, ResolvedKey]
    users: Mapping[str, User]
    teams: Mapping[str, Team]
    revoked_tokens: frozenset[str]

    def resolve(self, key: str | bytes, now: float) -> ResolvedKey | None:
        """The usable access key whose secret is `key`, or None."""
        digest = key_digest(key)
        entry = self.keys.get(digest)
        # The dict found the digest already; compare_digest keeps the final check constant-time.
        if entry is None or not hmac.compare_digest(entry.access_key.digest, digest):
            return None
        return entry if now < entry.expires_at else None


def check_object_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        raise StoreError(f"{what} name {name!r} is not valid: use lower-case letters, digits, '-' and '.'")
    return name


def header_value(value: str, what: str) -> str:
    """`value` if it can travel as one impersonation header value (auth.identity.check_header_value),
    else StoreError."""
    try:
        return check_header_value(value, what)
    except HeaderValueError as error:
        raise StoreError(str(error)) from None


def build_identity(user: str, groups: Iterable[str], source: str, scope: CompiledScope | None) -> Identity:
    unique = tuple(dict.fromkeys(groups))
    try:
        lines = identity_header_lines(user, unique)
    except HeaderValueError as error:
        raise StoreError(str(error)) from None
    return Identity(user, unique, source, lines, scope)


def user_groups(user: User, teams: Iterable[Team]) -> list[str]:
    """The groups of a user's identity: its own, those of `teams` (the ones it is a member of,
    by name), and the groups every user has."""
    groups = [*user.groups]
    for team in teams:
        groups += [*team.groups, f"loft:team:{team.name}"]
    return [*groups, *BASE_GROUPS, f"loft:user:{user.name}"]


def build_snapshot(version: int, users: Iterable[User], teams: Iterable[Team], keys: Iterable[AccessKey],
                   revoked_tokens: Iterable[str], now: float, *,
                   project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> Snapshot:
    """Build the snapshot; keys that must not resolve (disabled, expired, disabled user,
    unusable scope) are left out."""
    users_by_name = {user.name: user for user in users}
    teams_by_name = {team.name: team for team in teams}
    teams_of: dict[str, list[Team]] = {}
    for team in sorted(teams_by_name.values(), key=lambda team: team.name):
        for member in team.members:
            teams_of.setdefault(member, []).append(team)
    resolved: dict[bytes, ResolvedKey] = {}
    refresh_in = ACTIVITY_REFRESH_SECONDS
    for key in keys:
        expires_at = key.expires_at()
        if key.disabled or expires_at <= now:
            continue
        try:
            scope = None if key.scope is None else load_scope(
                key.scope, project_namespace_prefix=project_namespace_prefix)
        except ScopeError:
            continue  # fail closed: a scope this version cannot read grants nothing
        if key.user is not None:
            user = users_by_name.get(key.user)
            if user is None or user.disabled:
                continue
            identity = build_identity(user.subject or user.name, user_groups(user, teams_of.get(user.name, ())),
                                      key.name, scope)
        else:
            team = teams_by_name.get(key.team)
            if team is None:
                continue
            team_group = f"loft:team:{team.name}"
            identity = build_identity(team_group, [*team.groups, *BASE_GROUPS, team_group], key.name, scope)
        if key.ttl_after_last_activity:
            refresh_in = min(refresh_in, max(1.0, key.ttl / 4))
        resolved[key.digest] = ResolvedKey(key, identity, expires_at)
    return Snapshot(version, now, now + refresh_in, resolved, users_by_name, teams_by_name,
                    frozenset(revoked_tokens))


class StateAdmin(ABC):
    """The management side: users, teams, access keys and revoked token ids.

    Every method may block (it is a database or network round trip): call it from the CLI, a
    management API's worker thread, or an executor, never on a gateway event loop.
    Refusals raise StoreError with one line naming the bad value.
    """

    @abstractmethod
    def create_user(self, name: str, *, username: str = "", display_name: str = "", email: str = "",
                    subject: str = "", groups: Iterable[str] = ()) -> User: ...

    @abstractmethod
    def list_users(self) -> list[User]: ...

    @abstractmethod
    def disable_user(self, name: str) -> None: ...

    @abstractmethod
    def create_team(self, name: str, *, members: Iterable[str] = (), groups: Iterable[str] = ()) -> Team: ...

    @abstractmethod
    def list_teams(self) -> list[Team]: ...

    @abstractmethod
    def create_access_key(self, *, user: str | None = None, team: str | None = None, name: str | None = None,
                          type: str = "User", display_name: str = "", ttl: int = 0,
                          ttl_after_last_activity: bool = False, scope: Any = None,
                          now: float | None = None) -> tuple[AccessKey, str]:
        """Create a key; returns it with its secret, which is stored only as a digest."""

    @abstractmethod
    def list_access_keys(self) -> list[AccessKey]: ...

    @abstractmethod
    def disable_access_key(self, name: str) -> None: ...

    @abstractmethod
    def revoke_access_key(self, name: str) -> None:
        """Delete the key: it stops resolving once readers load the next snapshot."""

    @abstractmethod
    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Remember a token id as revoked until the token would have expired anyway."""

    @abstractmethod
    def close(self) -> None: ...


SnapshotCallback = Callable[[Snapshot], None]


class StateReader(ABC):
    """The data path's side: the current Snapshot, and word of each newer one.

    Life cycle, all on one event loop: construct (loads the first snapshot, may block: do it at
    startup), `subscribe` any number of callbacks, `start(loop)`, then `close()`. After `start`
    the reader delivers every newer snapshot by calling the subscribers on the loop, in
    subscription order, after updating `snapshot`; it never blocks the loop to do so. A polling
    backend asks the store in the background; a watching backend applies what it is pushed.
    If the store cannot be read the reader keeps the last good snapshot, logs once, and logs
    again once it recovers; `failing` says which state it is in.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.failing = False
        self._callbacks: list[SnapshotCallback] = []

    def subscribe(self, callback: SnapshotCallback) -> None:
        """Call `callback(snapshot)` on the loop each time a newer snapshot is loaded."""
        self._callbacks.append(callback)

    def publish(self, snapshot: Snapshot) -> None:
        """For backends, on the loop: make `snapshot` current and tell the subscribers."""
        self.snapshot = snapshot
        for callback in self._callbacks:
            callback(snapshot)

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin delivering newer snapshots on `loop`."""

    @abstractmethod
    def record_activity(self, batch: Mapping[str, float]) -> None:
        """Write last-activity times (key name -> unix time) without blocking the loop; a failed
        write is logged, not raised. Before `start` (or after `close`) it may write in place."""

    @abstractmethod
    def close(self) -> None:
        """Stop delivering, finish the activity writes already asked for, release the store."""
