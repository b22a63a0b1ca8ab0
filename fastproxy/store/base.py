"""The state store's two interfaces, and the snapshot the request path reads instead of the database.

The store has two sides. `StateAdmin` is the management side: the CRUD of users, teams, access
keys and revoked token ids that the CLI and the management API perform, with what a Kubernetes-style
API server needs of it: a uid, labels, annotations and a resourceVersion on every object, writes
that refuse a stale resourceVersion, and refusals whose kind (NotFoundError, AlreadyExistsError,
ConflictError, InvalidError) says which status to answer with. `StateReader`
is the data path's side: workers never query the store per request; they hold a Snapshot (every
usable access key by the SHA-256 digest of its secret, with its Identity built) that the reader
keeps current and hands to its subscribers whenever a newer one is loaded. How it learns of a
change is the backend's business: SQLite polls a generation counter off the event loop; a
watching backend (etcd, say) would push. Either way a snapshot is also reloaded when its
`refresh_at` passes, so that activity-based expiry is seen. The one write the data path makes,
batched last-activity times, goes through the reader too.

A snapshot's `version` and an object's `resource_version` count on one scale: every write gives the
objects it touches the store's version as of its end, so a snapshot whose version is at least an
object's resource_version includes that write, and `StateReader.wait_for` lets a writer wait for it.

`fastproxy.store.open_reader` / `open_admin` pick the backend named by `[state] backend`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import math
import re
import secrets
import ssl
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import immutables

from ..auth.identity import HeaderValueError, Identity, check_header_value, identity_header_lines, key_digest
from ..auth.passwords import HASH_PREFIX
from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, AccessKeyScope, CompiledScope, ScopeError, load_scope, parse_scope
from ..names import DNS_SUBDOMAIN

ACCESS_KEY_TYPES = ("Login", "User", "Other")
BASE_GROUPS = ("system:authenticated", "loft:authenticated")
# Other workers' activity reaches a snapshot only on reload; reload often enough that a key kept
# in use never looks idle past its ttlAfterLastActivity.
ACTIVITY_REFRESH_SECONDS = 60.0
ANNOTATIONS_MAX_BYTES = 256 * 1024  # keys and values together, as the Kubernetes API server allows
EMPTY: Mapping[str, str] = MappingProxyType({})  # the default labels and annotations


class StoreError(ValueError):
    """A refused store operation; the message is one line naming the bad value."""


class NotFoundError(StoreError):
    """The object named does not exist."""


class AlreadyExistsError(StoreError):
    """An object of that kind and name exists already."""


class ConflictError(StoreError):
    """The object changed since the version the write was based on."""


class UnavailableError(StoreError):
    """The store cannot be reached now (etcd down, say): the write may succeed later; answer 503."""


class InvalidError(StoreError):
    """A field value the store refuses; `field` is the store-level name of the field ("labels")."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class InvalidScopeError(InvalidError, ScopeError):
    """A scope that cannot be used: an InvalidError of the field "scope", and still a ScopeError for
    callers that report scopes apart."""

    def __init__(self, message: str):
        super().__init__(message, "scope")


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
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    resource_version: int = 0
    password_hash: str = field(default="", repr=False)  # argon2id (auth.passwords); "": no password login


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    members: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    created: float = 0.0
    display_name: str = ""
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    resource_version: int = 0


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
    last_activity: float | None = None   # written in batches by the data path: not a change of the key
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    resource_version: int = 0

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
class NamespaceActivity:
    """The last request that counted as sleep-mode activity in one namespace of one cluster."""

    cluster: str
    namespace: str
    last_activity: float              # unix time
    subject: str = ""
    verb: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    virtual_cluster: str = ""


@dataclass(frozen=True, slots=True)
class VirtualClusterInstance:
    """A virtual cluster an admin created in the management API: `name` in host namespace `namespace`
    of host cluster `cluster`, reached at `server` (with `ca_data` and `token`) or, when that is empty,
    through the host cluster's service proxy. The token is write-only: it is never rendered."""

    namespace: str
    name: str
    cluster: str
    server: str = ""
    ca_data: str = ""                  # base64 PEM of the CA bundle that signs server's certificate
    token: str = field(default="", repr=False)
    display_name: str = ""
    description: str = ""
    created: float = 0.0
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    resource_version: int = 0


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """Which access keys a snapshot changed from the one it was made from (`base`, while that one lives):
    so that a subscriber holding `base` diffs those keys alone, not every key."""

    base: weakref.ReferenceType[Snapshot]
    names: frozenset[str]


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    version: int
    loaded_at: float
    refresh_at: float                 # reload by then even if nothing changed (activity ttl)
    keys: Mapping[bytes, ResolvedKey]
    users: Mapping[str, User]
    teams: Mapping[str, Team]
    revoked_tokens: frozenset[str]
    access_keys: Mapping[str, AccessKey]  # every key by name, unusable ones too (`keys` holds the usable)
    # (cluster, namespace) -> activity; reloaded on its own generation, so activity never rebuilds keys
    activities: Mapping[tuple[str, str], NamespaceActivity] = field(default_factory=dict)
    activity_version: int = 0
    # (namespace, name) -> the virtual clusters created in the management API
    virtual_cluster_instances: Mapping[tuple[str, str], VirtualClusterInstance] = field(default_factory=dict)
    # Set by with_keys_changed; None: a full build, which a subscriber compares whole.
    key_changes: KeyChanges | None = field(default=None, compare=False, repr=False)

    def resolve(self, key: str | bytes, now: float) -> ResolvedKey | None:
        """The usable access key whose secret is `key`, or None."""
        digest = key_digest(key)
        entry = self.keys.get(digest)
        # The dict found the digest already; compare_digest keeps the final check constant-time.
        if entry is None or not hmac.compare_digest(entry.access_key.digest, digest):
            return None
        return entry if now < entry.expires_at else None


def new_uid() -> str:
    """An object's uid: set once at creation, so that a client can tell a re-created object from the old one."""
    return str(uuid.uuid4())


def check_object_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        raise InvalidError(f"{what} name {name!r} is not valid: use lower-case letters, digits, '-' and '.'", "name")
    return name


def header_value(value: str, what: str, field: str | None = None) -> str:
    """`value` if it can travel as one impersonation header value (auth.identity.check_header_value),
    else InvalidError of `field` (default: `what`)."""
    try:
        return check_header_value(value, what)
    except HeaderValueError as error:
        raise InvalidError(str(error), field or what) from None


def check_version(obj: User | Team | AccessKey | VirtualClusterInstance, what: str, expected: int | None) -> None:
    """ConflictError unless `obj` is still at the `expected` resource version (None: any)."""
    if expected is not None and expected != obj.resource_version:
        raise ConflictError(f"{what} {obj.name!r} has been modified; please apply your changes to the latest "
                            "version and try again")


# A label name or value, and the name part of a label or annotation key, as Kubernetes has them.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_LABEL_RULE = "at most 63 letters, digits, '-', '_' and '.', beginning and ending with a letter or digit"


def _qualified_key(key: object) -> bool:
    """A label or annotation key: a name, optionally after a DNS subdomain prefix and '/'."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    return bool(_LABEL_NAME.match(name)) and (not slash or bool(DNS_SUBDOMAIN.match(prefix)))


def _string_map(value: Any, field: str, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidError(f"{field} must be a map of strings, not {type(value).__name__}", field)
    for key, item in value.items():
        if not _qualified_key(key):
            raise InvalidError(f"{what} key {key!r} is not valid: use {_LABEL_RULE}, optionally after a "
                               "DNS subdomain prefix and '/'", field)
        if not isinstance(item, str):
            raise InvalidError(f"{what} {key!r}: value {item!r} is not a string", field)
    return dict(value)


def check_labels(raw: Any) -> dict[str, str]:
    """`raw` as a dict of labels, or InvalidError naming the first key Kubernetes would refuse."""
    labels = _string_map(raw, "labels", "label")
    for key, value in labels.items():
        if value and not _LABEL_NAME.match(value):
            raise InvalidError(f"label {key!r}: value {value!r} is not valid: use {_LABEL_RULE}, or nothing", "labels")
    return labels


def check_annotations(raw: Any) -> dict[str, str]:
    """`raw` as a dict of annotations, or InvalidError; large values (kubectl's last-applied-configuration)
    are fine up to ANNOTATIONS_MAX_BYTES in all."""
    annotations = _string_map(raw, "annotations", "annotation")
    size = sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        raise InvalidError(f"annotations are {size} bytes in all, more than the {ANNOTATIONS_MAX_BYTES} allowed",
                           "annotations")
    return annotations


def _text(field: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidError(f"{field} {value!r} is not a string", field)
        return value
    return check


def _flag(field: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidError(f"{field} {value!r} is not true or false", field)
        return value
    return check


def check_password_hash(value: Any) -> str:
    """An argon2id hash as auth.passwords makes it, or "" for none: the store never takes a password itself."""
    if not isinstance(value, str) or (value and not value.startswith(HASH_PREFIX)):
        raise InvalidError("password_hash is not an argon2id hash (auth.passwords.hash_password makes one)", "password")
    return value


def _names(value: Any, field: str) -> list[Any]:
    """The items of a list field; a lone string would otherwise count as a list of letters."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidError(f"{field} {value!r} is not a list of strings", field)
    return list(value)


def check_groups(groups: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(header_value(group, "group", "groups") for group in _names(groups, "groups")))


def check_members(members: Any) -> tuple[str, ...]:
    """Member names, sorted and unique; whether each is a user is the backend's to check."""
    names = _names(members, "members")
    for name in names:
        if not isinstance(name, str):
            raise InvalidError(f"team member {name!r} is not a user name", "members")
    return tuple(sorted(set(names)))


def scope_json(scope: Any) -> dict[str, Any] | None:
    """The JSON form of an access key scope given as JSON, a mapping or an AccessKeyScope (None: no scope)."""
    if scope is None:
        return None
    if isinstance(scope, AccessKeyScope):
        return scope.to_dict()
    try:
        return parse_scope(scope).to_dict()
    except ScopeError as error:
        raise InvalidScopeError(str(error)) from None


MAX_TOKEN_BYTES = 16 * 1024


def check_server_url(value: Any) -> str:
    """"" (the host's service proxy) or an https URL with a host and no path: a token never travels in clear."""
    if not isinstance(value, str):
        raise InvalidError(f"server {value!r} is not a string", "server")
    if not value:
        return value
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        url, port = None, None
    if url is None or url.scheme != "https" or not url.hostname or url.path not in ("", "/") or url.query \
            or url.fragment or url.username is not None or (port is not None and not 0 < port < 65536):
        raise InvalidError(f"server {value!r} is not an https URL of a host (and port) alone", "server")
    return value


def check_ca_data(value: Any) -> str:
    """"" (the system's CAs) or base64 PEM certificates, as kubeconfig's certificate-authority-data."""
    if not isinstance(value, str):
        raise InvalidError("caData is not a string", "ca_data")
    if not value:
        return value
    try:
        ssl.create_default_context(cadata=base64.b64decode(value, validate=True).decode("ascii"))
    except (ValueError, ssl.SSLError, UnicodeDecodeError):
        raise InvalidError("caData is not base64 of PEM certificates", "ca_data") from None
    return value


def check_token(value: Any) -> str:
    """A bearer token that fits in one header line ("" for none); never quoted back, it may be real."""
    if not isinstance(value, str) or len(value) > MAX_TOKEN_BYTES or \
            not all("!" <= char <= "~" for char in value):
        raise InvalidError(f"token is not printable ASCII without spaces of at most {MAX_TOKEN_BYTES} bytes", "token")
    return value


def new_user(name: str, fields: Mapping[str, Any]) -> User:
    """A new user from a create's arguments, every one checked (both backends' part)."""
    check_object_name(name, "user")
    return User(name, created=time.time(), uid=new_uid(), **user_changes(name, fields))


def new_team(name: str, fields: Mapping[str, Any]) -> Team:
    """A new team from a create's arguments, every one checked (both backends' part)."""
    check_object_name(name, "team")
    return Team(name, created=time.time(), uid=new_uid(), **checked_changes(TEAM_FIELDS, fields, "team"))


def new_instance(namespace: str, name: str, fields: Mapping[str, Any]) -> VirtualClusterInstance:
    """A new virtual cluster instance from a create's arguments, every one checked (both backends' part)."""
    check_object_name(namespace, "namespace")
    check_object_name(name, "virtual cluster")
    checked = checked_changes(INSTANCE_FIELDS, fields, "virtual cluster instance")
    return check_instance(VirtualClusterInstance(namespace, name, created=time.time(), uid=new_uid(), **checked))


def check_instance(instance: VirtualClusterInstance) -> VirtualClusterInstance:
    """What holds across fields: a CA and a token only for a server of its own."""
    if not instance.server and (instance.ca_data or instance.token):
        raise InvalidError("caData and token need a server (without one the host's service proxy is used with "
                           "the host's credential)", "server")
    return instance


def new_access_key(user: str | None, team: str | None, name: str | None, type: str, ttl: int,
                   ttl_after_last_activity: bool, now: float | None, fields: Mapping[str, Any]) -> tuple[AccessKey, str]:
    """A new access key and its secret from a create's arguments, every one checked (both backends'
    part); the key holds only the secret's digest."""
    check_new_key(user, team, type, ttl, ttl_after_last_activity)
    checked = checked_changes(ACCESS_KEY_FIELDS, fields, "access key")
    owner = user if user is not None else team
    name = check_object_name(name or f"{owner}-{secrets.token_hex(4)}", "access key")
    secret = secrets.token_urlsafe(32)
    key = AccessKey(name, type, user, team, key_digest(secret), ttl=ttl, ttl_after_last_activity=ttl_after_last_activity,
                    created=time.time() if now is None else now, uid=new_uid(), **checked)
    return key, secret


def check_new_key(user: str | None, team: str | None, type: str, ttl: int, ttl_after_last_activity: bool) -> None:
    """The fields an access key has from its creation on."""
    if (user is None) == (team is None):
        raise InvalidError("an access key belongs to exactly one user or one team", "user")
    owner, what = (user, "user") if user is not None else (team, "team")
    if not isinstance(owner, str):
        raise InvalidError(f"access key owner {owner!r} is not a {what} name", what)
    if type not in ACCESS_KEY_TYPES:
        raise InvalidError(f"access key type {type!r} is not one of {', '.join(ACCESS_KEY_TYPES)}", "type")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        raise InvalidError(f"ttl {ttl!r} must be a whole number of seconds, 0 for no expiry", "ttl")
    if not isinstance(ttl_after_last_activity, bool):
        raise InvalidError(f"ttl_after_last_activity {ttl_after_last_activity!r} is not true or false",
                           "ttl_after_last_activity")
    if ttl_after_last_activity and not ttl:
        raise InvalidError("ttlAfterLastActivity needs a ttl", "ttl_after_last_activity")


# What each kind's create and update may set: field -> its check, which returns the value to store.
_METADATA: dict[str, Callable[[Any], Any]] = {
    "description": _text("description"), "labels": check_labels, "annotations": check_annotations}
USER_FIELDS: dict[str, Callable[[Any], Any]] = {
    "username": _text("username"), "display_name": _text("display_name"), "email": _text("email"),
    "subject": lambda value: header_value(value, "subject"), "groups": check_groups, "disabled": _flag("disabled"),
    "password_hash": check_password_hash, **_METADATA}
TEAM_FIELDS: dict[str, Callable[[Any], Any]] = {
    "display_name": _text("display_name"), "members": check_members, "groups": check_groups, **_METADATA}
ACCESS_KEY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "display_name": _text("display_name"), "disabled": _flag("disabled"), "scope": scope_json, **_METADATA}
INSTANCE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "cluster": lambda value: check_object_name(value, "host cluster"), "server": check_server_url,
    "ca_data": check_ca_data, "token": check_token, "display_name": _text("display_name"), **_METADATA}


def checked_changes(fields: Mapping[str, Callable[[Any], Any]], changes: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`changes` with every value checked; TypeError for a field `what` does not have (a caller's bug)."""
    for name in changes:
        if name not in fields:
            raise TypeError(f"there is no {what} field {name!r} that can be set")
    return {name: fields[name](value) for name, value in changes.items()}


def user_changes(name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Checked user fields; an empty username or subject stands for the user's name, at creation as on update."""
    named = {field: changes[field] or name for field in ("username", "subject") if field in changes}
    return checked_changes(USER_FIELDS, {**changes, **named}, "user")


def check_revoked_token(jti: Any, expires_at: Any) -> None:
    if not isinstance(jti, str) or not jti:
        raise InvalidError(f"token id {jti!r} is not a non-empty string", "jti")
    if not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool) or not math.isfinite(expires_at):
        raise InvalidError(f"token expiry {expires_at!r} is not a unix time", "expires_at")


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


def _teams_of(teams: Mapping[str, Team]) -> dict[str, list[Team]]:
    """User name -> the teams it is a member of, by team name."""
    teams_of: dict[str, list[Team]] = {}
    for team in sorted(teams.values(), key=lambda team: team.name):
        for member in team.members:
            teams_of.setdefault(member, []).append(team)
    return teams_of


def _resolved(key: AccessKey, users: Mapping[str, User], teams: Mapping[str, Team], teams_of: Mapping[str, list[Team]],
              now: float, project_namespace_prefix: str) -> ResolvedKey | None:
    """The key with its identity, or None for a key that must not resolve (disabled, expired,
    disabled or missing owner, unusable scope)."""
    expires_at = key.expires_at()
    if key.disabled or expires_at <= now:
        return None
    try:
        scope = None if key.scope is None else load_scope(key.scope, project_namespace_prefix=project_namespace_prefix)
    except ScopeError:
        return None  # fail closed: a scope this version cannot read grants nothing
    if key.user is not None:
        user = users.get(key.user)
        if user is None or user.disabled:
            return None
        identity = build_identity(user.subject or user.name, user_groups(user, teams_of.get(user.name, ())),
                                  key.name, scope)
    else:
        team = teams.get(key.team) if key.team is not None else None
        if team is None:
            return None
        team_group = f"loft:team:{team.name}"
        identity = build_identity(team_group, [*team.groups, *BASE_GROUPS, team_group], key.name, scope)
    return ResolvedKey(key, identity, expires_at)


def _refresh_in(key: AccessKey) -> float:
    return max(1.0, key.ttl / 4) if key.ttl_after_last_activity else ACTIVITY_REFRESH_SECONDS


def build_snapshot(version: int, users: Iterable[User], teams: Iterable[Team], keys: Iterable[AccessKey],
                   revoked_tokens: Iterable[str], now: float, *,
                   project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> Snapshot:
    """Build the snapshot; keys that must not resolve (disabled, expired, disabled user,
    unusable scope) are left out of `keys`, not of `access_keys`."""
    users_by_name = {user.name: user for user in users}
    teams_by_name = {team.name: team for team in teams}
    teams_of = _teams_of(teams_by_name)
    resolved: dict[bytes, ResolvedKey] = {}
    keys_by_name: dict[str, AccessKey] = {}
    refresh_in = ACTIVITY_REFRESH_SECONDS
    for key in keys:
        keys_by_name[key.name] = key
        entry = _resolved(key, users_by_name, teams_by_name, teams_of, now, project_namespace_prefix)
        if entry is not None:
            refresh_in = min(refresh_in, _refresh_in(key))
            resolved[key.digest] = entry
    return Snapshot(version, now, now + refresh_in, resolved, users_by_name, teams_by_name,
                    frozenset(revoked_tokens), keys_by_name)


def with_keys_changed(snapshot: Snapshot, version: int, changed: Iterable[AccessKey], removed: Iterable[str], now: float, *,
                      project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> Snapshot:
    """`snapshot` at `version` with access keys `changed` (new or updated) and `removed` (by name):
    what build_snapshot would give for the same objects, resolving only the keys that changed, so that
    a store told of each change applies a revocation in a large store without rebuilding every identity.
    `refresh_at` only moves earlier (a removed key's deadline stays): the next reload comes early, never late.
    The result's `key_changes` names the keys given, against `snapshot`; users, teams and the lists stay the
    same objects, so that a subscriber can tell by identity what did not change."""
    changed, removed = list(changed), list(removed)
    changes = KeyChanges(weakref.ref(snapshot), frozenset([*removed, *(key.name for key in changed)]))
    if not changes.names:  # activity of keys it does not bear on: a new version, nothing to copy
        return replace(snapshot, version=version, key_changes=changes)
    # What changes, by digest and by name (None: gone), applied in order; then applied to immutable maps,
    # which copy the few nodes touched rather than every key (a full build's dicts become such maps once).
    digests: dict[bytes, ResolvedKey | None] = {}
    names: dict[str, AccessKey | None] = {}
    refresh_at = snapshot.refresh_at
    teams_of: dict[str, list[Team]] | None = None
    for name in removed:
        old = names[name] if name in names else snapshot.access_keys.get(name)
        if old is not None:
            names[name], digests[old.digest] = None, None
    for key in changed:
        old = names[key.name] if key.name in names else snapshot.access_keys.get(key.name)
        if old is not None:
            digests[old.digest] = None
        names[key.name] = key
        if teams_of is None:
            teams_of = _teams_of(snapshot.teams)
        entry = _resolved(key, snapshot.users, snapshot.teams, teams_of, now, project_namespace_prefix)
        if entry is not None:
            digests[key.digest] = entry
            refresh_at = min(refresh_at, now + _refresh_in(key))
    return replace(snapshot, version=version, keys=_changed(snapshot.keys, digests),
                   access_keys=_changed(snapshot.access_keys, names), refresh_at=refresh_at, key_changes=changes)


def _changed(entries: Mapping[Any, Any], changes: Mapping[Any, Any]) -> immutables.Map[Any, Any]:
    """`entries` with `changes` applied (None: the key removed), as an immutable map that shares
    what did not change with `entries` (a hash array mapped trie: a change copies a few nodes)."""
    shared = entries if isinstance(entries, immutables.Map) else immutables.Map(entries)
    with shared.mutate() as mutation:
        for key, value in changes.items():
            if value is None:
                mutation.pop(key, None)
            else:
                mutation[key] = value
        return mutation.finish()


class StateAdmin(ABC):
    """The management side: users, teams, access keys and revoked token ids.

    Every method may block (it is a database or network round trip): call it from the CLI, a
    management API's worker thread, or an executor, never on a gateway event loop.
    Refusals raise a StoreError with one line naming the bad value, of the subclass that says why:
    NotFoundError, AlreadyExistsError, ConflictError (an `expected_version` that is not the stored
    one) or InvalidError. Every write returns the object as stored, its `resource_version` the
    store's version at the end of the write (deletes too: the version at which it is gone).
    Labels and annotations given to an update replace the old ones wholly.
    """

    @abstractmethod
    def create_user(self, name: str, *, username: str = "", display_name: str = "", email: str = "",
                    subject: str = "", groups: Iterable[str] = (), disabled: bool = False, description: str = "",
                    labels: Mapping[str, str] = EMPTY, annotations: Mapping[str, str] = EMPTY,
                    password_hash: str = "") -> User: ...

    @abstractmethod
    def get_user(self, name: str) -> User: ...

    @abstractmethod
    def list_users(self) -> list[User]: ...

    @abstractmethod
    def _update_checked(self, what: str, name: str, expected_version: int | None, fields: Mapping[str, Any]) -> Any:
        """Set the checked `fields` of the `what` ("user", "team", "access key") named `name`; a change of
        nothing writes nothing. The one write path behind every backend's update_user/team/access_key."""

    def update_user(self, name: str, *, expected_version: int | None = None, **changes: Any) -> User:
        """Set any of USER_FIELDS; an update that changes nothing writes nothing. A password is set as
        `password_hash=auth.passwords.hash_password(text)` ("" removes it): the store never sees the text."""
        user: User = self._update_checked("user", name, expected_version, user_changes(name, changes))
        return user

    def disable_user(self, name: str) -> None:
        self.update_user(name, disabled=True)

    @abstractmethod
    def delete_user(self, name: str, *, expected_version: int | None = None) -> User:
        """Delete the user, its access keys and its team memberships (a change of those teams)."""

    @abstractmethod
    def create_team(self, name: str, *, members: Iterable[str] = (), groups: Iterable[str] = (), display_name: str = "",
                    description: str = "", labels: Mapping[str, str] = EMPTY,
                    annotations: Mapping[str, str] = EMPTY) -> Team: ...

    @abstractmethod
    def get_team(self, name: str) -> Team: ...

    @abstractmethod
    def list_teams(self) -> list[Team]: ...

    def update_team(self, name: str, *, expected_version: int | None = None, **changes: Any) -> Team:
        """Set any of TEAM_FIELDS; every member must be a user."""
        team: Team = self._update_checked("team", name, expected_version, checked_changes(TEAM_FIELDS, changes, "team"))
        return team

    @abstractmethod
    def delete_team(self, name: str, *, expected_version: int | None = None) -> Team:
        """Delete the team and its access keys."""

    @abstractmethod
    def create_access_key(self, *, user: str | None = None, team: str | None = None, name: str | None = None,
                          type: str = "User", display_name: str = "", ttl: int = 0,
                          ttl_after_last_activity: bool = False, scope: Any = None,
                          now: float | None = None, description: str = "", labels: Mapping[str, str] = EMPTY,
                          annotations: Mapping[str, str] = EMPTY) -> tuple[AccessKey, str]:
        """Create a key; returns it with its secret, which is stored only as a digest."""

    @abstractmethod
    def get_access_key(self, name: str) -> AccessKey: ...

    @abstractmethod
    def list_access_keys(self) -> list[AccessKey]: ...

    def update_access_key(self, name: str, *, expected_version: int | None = None, **changes: Any) -> AccessKey:
        """Set any of ACCESS_KEY_FIELDS; the secret, owner, type and lifetime stay as created."""
        key: AccessKey = self._update_checked("access key", name, expected_version,
                                              checked_changes(ACCESS_KEY_FIELDS, changes, "access key"))
        return key

    def disable_access_key(self, name: str) -> None:
        self.update_access_key(name, disabled=True)

    @abstractmethod
    def delete_access_key(self, name: str, *, expected_version: int | None = None) -> AccessKey:
        """Delete the key: it stops resolving once readers load the next snapshot."""

    def revoke_access_key(self, name: str) -> None:
        """Delete the key, as delete_access_key does."""
        self.delete_access_key(name)

    @abstractmethod
    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Remember a token id as revoked until the token would have expired anyway."""

    @abstractmethod
    def create_virtual_cluster_instance(self, namespace: str, name: str, *, cluster: str, server: str = "",
                                        ca_data: str = "", token: str = "", display_name: str = "",
                                        description: str = "", labels: Mapping[str, str] = EMPTY,
                                        annotations: Mapping[str, str] = EMPTY) -> VirtualClusterInstance: ...

    @abstractmethod
    def list_virtual_cluster_instances(self) -> list[VirtualClusterInstance]: ...

    @abstractmethod
    def update_virtual_cluster_instance(self, namespace: str, name: str, *, expected_version: int | None = None,
                                        **changes: Any) -> VirtualClusterInstance:
        """Set any of INSTANCE_FIELDS; the token stays as it is unless given ("" removes it)."""

    @abstractmethod
    def delete_virtual_cluster_instance(self, namespace: str, name: str, *,
                                        expected_version: int | None = None) -> VirtualClusterInstance:
        """Delete it: every worker stops serving it once it loads the next snapshot."""

    @abstractmethod
    def list_namespace_activity(self) -> list[NamespaceActivity]:
        """The sleep-mode activity of every namespace that had some, by cluster and namespace."""

    @abstractmethod
    def put_grant(self, digest: bytes, kind: str, data: str, expires_at: float) -> None:
        """Keep an OpenID Connect grant (code, access or refresh token) by its secret's digest."""

    @abstractmethod
    def take_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        """Remove and return a live grant's data, atomically: of two takers at once, one gets it."""

    @abstractmethod
    def read_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        """A live grant's data, left in place."""

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
    again once it recovers; `failing` says which state it is in. `wait_for(version)` hands a writer
    the first snapshot that holds its write.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.failing = False
        self.closed = False
        self._callbacks: list[SnapshotCallback] = []
        self._waiters: dict[asyncio.Future[Snapshot], int] = {}  # future -> the version it waits for

    def subscribe(self, callback: SnapshotCallback) -> None:
        """Call `callback(snapshot)` on the loop each time a newer snapshot is loaded."""
        self._callbacks.append(callback)

    def publish(self, snapshot: Snapshot) -> None:
        """For backends, on the loop: make `snapshot` current and tell the subscribers, then the waiters."""
        self.snapshot = snapshot
        for callback in self._callbacks:
            callback(snapshot)
        for future, version in list(self._waiters.items()):
            if version <= snapshot.version:
                del self._waiters[future]
                if not future.done():
                    future.set_result(snapshot)

    def wait_for(self, version: int) -> asyncio.Future[Snapshot]:
        """On the loop: the first snapshot at `version` or newer, so that a writer that got `version`
        back can answer from a snapshot holding its write. Done at once if the current snapshot is;
        otherwise the backend is asked to look now rather than at its next poll. Cancel the future
        to stop waiting (nothing is kept for it); close() cancels those still waiting."""
        future: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
        if self.snapshot.version >= version:
            future.set_result(self.snapshot)
        elif self.closed:
            future.cancel()
        else:
            self._waiters[future] = version
            future.add_done_callback(self._forget)
            self.poll_now()
        return future

    def _forget(self, future: asyncio.Future[Snapshot]) -> None:
        self._waiters.pop(future, None)

    @abstractmethod
    def poll_now(self) -> None:
        """On the loop: look at the store now instead of at the next poll, without blocking; a
        watching backend, told of every change as it happens, has nothing to do."""

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin delivering newer snapshots on `loop`."""

    @abstractmethod
    def record_activity(self, batch: Mapping[str, float]) -> None:
        """Write last-activity times (key name -> unix time) without blocking the loop; a failed
        write is logged, not raised. Before `start` (or after `close`) it may write in place."""

    @abstractmethod
    def record_namespace_activity(self, batch: Mapping[tuple[str, str], NamespaceActivity]) -> None:
        """Write namespace activity (sleep mode) without blocking the loop, like record_activity;
        a write older than what is stored for a namespace leaves it as it is."""

    @abstractmethod
    def close(self) -> None:
        """Stop delivering, finish the activity writes already asked for, release the store.
        Backends end with super().close(), which cancels the futures of wait_for still waiting."""
        self.closed = True
        waiting, self._waiters = self._waiters, {}
        for future in waiting:
            future.cancel()
