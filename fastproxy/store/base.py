"""The identity store's interface and the snapshot the request path reads instead of the database.

Workers never query the store per request: they hold a Snapshot (every usable access key by the
SHA-256 digest of its secret, with its Identity built), poll `changed_since` a few times a second
and load a new snapshot when it answers True or when `refresh_at` passes.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..auth.identity import Identity
from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, CompiledScope, ScopeError, load_scope

ACCESS_KEY_TYPES = ("Login", "User", "Other")
BASE_GROUPS = ("system:authenticated", "loft:authenticated")
# Other workers' activity reaches a snapshot only on reload; reload often enough that a key kept
# in use never looks idle past its ttlAfterLastActivity.
ACTIVITY_REFRESH_SECONDS = 60.0

_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def check_object_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _OBJECT_NAME.match(name):
        raise StoreError(f"{what} name {name!r} is not valid: use lower-case letters, digits, '-' and '.'")
    return name


def check_header_value(value: str, what: str) -> str:
    """Refuse what could not travel as one impersonation header value.

    Leading or trailing spaces are refused too: HTTP parsers strip them, so " system:masters"
    would arrive upstream as "system:masters".
    """
    if not value or _CONTROL.search(value) or value != value.strip():
        raise StoreError(f"{what} {value!r} must be non-empty, without CR, LF, NUL or other control "
                         "characters and without leading or trailing spaces")
    return value


def impersonation_headers(user: str, groups: Iterable[str]) -> bytes:
    """The Impersonate-User / Impersonate-Group header lines for the upstream request."""
    block = [b"Impersonate-User: " + check_header_value(user, "user").encode() + b"\r\n"]
    for group in groups:
        block.append(b"Impersonate-Group: " + check_header_value(group, "group").encode() + b"\r\n")
    return b"".join(block)


def build_identity(user: str, groups: Iterable[str], source: str, scope: CompiledScope | None) -> Identity:
    unique = tuple(dict.fromkeys(groups))
    return Identity(user, unique, source, impersonation_headers(user, unique), scope)


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


class Store(ABC):
    """Users, teams, access keys, revoked token ids and key activity."""

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
        """Delete the key: it stops resolving once workers load the next snapshot."""

    @abstractmethod
    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Remember a token id as revoked until the token would have expired anyway."""

    @abstractmethod
    def record_activity(self, batch: Mapping[str, float]) -> None:
        """Write last-activity times (key name -> unix time) in one transaction."""

    @abstractmethod
    def load_snapshot(self, now: float | None = None) -> Snapshot: ...

    @abstractmethod
    def changed_since(self, version: int) -> bool:
        """Whether anything a snapshot holds changed after `version`; cheap enough to poll."""

    @abstractmethod
    def close(self) -> None: ...
