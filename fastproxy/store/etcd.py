"""The etcd state store: one etcd (cluster) shared by a fleet of gateways, every key under `[state] prefix`.

Layout: PREFIX + FOLDER + name, the value an object's fields as JSON (`Kind` says how each kind
is encoded; a new kind is one more `Kind`). An object's etcd mod_revision is its resource_version,
and a snapshot's version the revision of the last change it holds: both count on etcd's one
revision scale, as base.py asks. Every write is a transaction comparing the mod_revision of what
it read (absent keys: create_revision 0), retried from the read when something moved meanwhile,
so a stale `expected_version` ends as ConflictError and a vanished owner as NotFoundError.

Last activity of access keys lives apart (ACTIVITY folder) so that it never changes a key's
resource_version; revoked token ids carry a lease that ends when the token would have expired.

`EtcdReader` loads everything under the prefix once (one read at one revision), then applies the
changes of a watch from the revision after it; a watch behind a compaction loads again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import immutables
import orjson

from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX
from ..config import EtcdConfig
from ..names import DNS_SUBDOMAIN
from .base import (
    EMPTY,
    INSTANCE_FIELDS,
    AccessKey,
    AlreadyExistsError,
    ConflictError,
    InvalidError,
    NamespaceActivity,
    NotFoundError,
    Snapshot,
    StateAdmin,
    StateReader,
    Team,
    UnavailableError,
    User,
    VirtualClusterInstance,
    build_snapshot,
    check_instance,
    check_revoked_token,
    check_version,
    checked_changes,
    new_access_key,
    new_instance,
    new_team,
    new_user,
    with_keys_changed,
)
from .etcd_client import CompactedError, EtcdClient, KeyValue, WatchEvent, b64, prefix_end, unb64

log = logging.getLogger("fastproxy.store")

TXN_KEYS = 100              # keys per activity transaction: etcd refuses more than 128 operations in one
TXN_ATTEMPTS = 20            # a write whose reads keep moving under it gives up with ConflictError
ACTIVITY_FLUSH_SECONDS = 5.0  # activity is coalesced per key (the latest wins) and written this often
UNREACHABLE_LOG_SECONDS = 60.0
BACKOFF = (0.1, 5.0)          # reconnect delay: from, doubling up to
ACTIVITY = "activity/"         # access key name -> last activity (unix time)
NAMESPACE_ACTIVITY = "namespace-activity/"  # cluster/namespace -> NamespaceActivity fields
REVOKED = "revoked-tokens/"   # jti -> expires_at, leased
GRANTS = "oidc-grants/"       # SHA-256 of a code or token (hex) -> its kind, data, expiry; leased

Obj = TypeVar("Obj", User, Team, AccessKey)


@dataclass(frozen=True)
class Kind(Generic[Obj]):
    """How one kind is stored: its folder, and its dataclass's fields as JSON (tuples as lists, bytes as hex)."""

    what: str
    folder: str
    type: type[Obj]
    kept_apart: tuple[str, ...] = ()  # fields not in the value (stored elsewhere, or etcd's own)

    def encode(self, obj: Obj) -> bytes:
        skip = {"name", "resource_version", *self.kept_apart}
        return orjson.dumps({f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip})

    def decode(self, name: str, value: bytes, mod_revision: int) -> Obj:
        fields = {f.name: f for f in dataclasses.fields(self.type)}
        doc = {key: _typed(fields[key].type, item) for key, item in orjson.loads(value).items() if key in fields}
        return self.type(name=name, resource_version=mod_revision, **doc)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return dict(value) if isinstance(value, Mapping) and value is not None else value


def _typed(annotation: Any, value: Any) -> Any:
    text = str(annotation)
    if text.startswith("tuple") and isinstance(value, list):
        return tuple(value)
    return bytes.fromhex(value) if text == "bytes" else value


@dataclass(frozen=True)
class InstanceKind(Kind[Any]):
    """Virtual cluster instances: keyed NAMESPACE/NAME (both kept out of the value)."""

    def encode(self, obj: Any) -> bytes:
        skip = {"namespace", "name", "resource_version"}
        return orjson.dumps({f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip})

    def decode(self, name: str, value: bytes, mod_revision: int) -> Any:
        namespace, _, instance = name.partition("/")
        fields = {f.name: f for f in dataclasses.fields(VirtualClusterInstance)}
        doc = {key: _typed(fields[key].type, item) for key, item in orjson.loads(value).items() if key in fields}
        return VirtualClusterInstance(namespace=namespace, name=instance, resource_version=mod_revision, **doc)


USERS = Kind[User]("user", "users/", User)
TEAMS = Kind[Team]("team", "teams/", Team)
ACCESS_KEYS = Kind[AccessKey]("access key", "access-keys/", AccessKey, kept_apart=("last_activity",))
_KINDS: dict[str, Kind[Any]] = {kind.what: kind for kind in (USERS, TEAMS, ACCESS_KEYS)}
INSTANCES = InstanceKind("virtual cluster instance", "virtual-cluster-instances/", VirtualClusterInstance)
KINDS: tuple[Kind[Any], ...] = (USERS, TEAMS, ACCESS_KEYS, INSTANCES)


@dataclass
class FleetState:
    """Everything under the prefix, decoded, at `revision`: what a reader keeps and applies watch events to."""

    revision: int = 0
    objects: dict[str, dict[str, Any]] = field(default_factory=lambda: {kind.folder: {} for kind in KINDS})
    activity: dict[str, float] = field(default_factory=dict)
    namespaces: dict[tuple[str, str], NamespaceActivity] = field(default_factory=dict)
    revoked: dict[str, float] = field(default_factory=dict)

    def apply(self, prefix: str, deleted: bool, kv: KeyValue) -> tuple[str, str]:
        """Apply one change; returns the folder and name it was of (so a caller knows what to rebuild)."""
        rest = kv.key[len(prefix):]
        for kind in KINDS:
            if rest.startswith(kind.folder):
                name = rest[len(kind.folder):]
                objects = self.objects[kind.folder]
                if deleted:
                    objects.pop(name, None)
                else:
                    objects[name] = kind.decode(name, kv.value, kv.mod_revision)
                return kind.folder, name
        for folder, store in ((ACTIVITY, self.activity), (REVOKED, self.revoked)):
            if rest.startswith(folder):
                if deleted:
                    store.pop(rest[len(folder):], None)
                else:
                    store[rest[len(folder):]] = float(orjson.loads(kv.value))
                return folder, rest[len(folder):]
        if rest.startswith(NAMESPACE_ACTIVITY):
            cluster, _, namespace = rest[len(NAMESPACE_ACTIVITY):].partition("/")
            if deleted:
                self.namespaces.pop((cluster, namespace), None)
            else:
                self.namespaces[cluster, namespace] = NamespaceActivity(cluster, namespace, **orjson.loads(kv.value))
            return NAMESPACE_ACTIVITY, rest
        return "", rest  # a key of a newer version's kind: not ours to read

    def access_key(self, name: str) -> AccessKey:
        key: AccessKey = self.objects[ACCESS_KEYS.folder][name]
        return replace(key, last_activity=self.activity[name]) if name in self.activity else key

    def access_keys(self) -> list[AccessKey]:
        keys: dict[str, AccessKey] = self.objects[ACCESS_KEYS.folder]
        return [self.access_key(name) for name in sorted(keys)]

    def snapshot(self, now: float, project_namespace_prefix: str) -> Snapshot:
        snapshot = build_snapshot(self.revision, self.objects[USERS.folder].values(), self.objects[TEAMS.folder].values(),
                                  self.access_keys(), (), now, project_namespace_prefix=project_namespace_prefix)
        # Immutable maps from the start: each change the watch brings then copies a few nodes, not every key.
        snapshot = replace(snapshot, keys=immutables.Map(snapshot.keys), access_keys=immutables.Map(snapshot.access_keys))
        return self.with_lists(snapshot, now)

    def with_lists(self, snapshot: Snapshot, now: float) -> Snapshot:
        """`snapshot` with the revoked token ids and namespace activity as they are now."""
        instances = sorted(self.objects[INSTANCES.folder].values(), key=lambda i: (i.namespace, i.name))
        return replace(snapshot, revoked_tokens=frozenset(jti for jti, until in self.revoked.items() if until > now),
                       activities=dict(sorted(self.namespaces.items())), activity_version=self.revision,
                       virtual_cluster_instances={(i.namespace, i.name): i for i in instances})


def _put(key: str, value: bytes, lease: str | None = None) -> dict[str, Any]:
    put = {"key": b64(key), "value": b64(value)}
    return {"request_put": {**put, "lease": lease} if lease else put}


def _delete(key: str, answer_with_it: bool = False) -> dict[str, Any]:
    """The deletion of `key`; `answer_with_it`: etcd's answer holds what was deleted (prev_kv)."""
    return {"request_delete_range": {"key": b64(key), "prev_kv": True} if answer_with_it else {"key": b64(key)}}


def _unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    """The comparison that holds while `key` is as read (mod_revision 0: still absent)."""
    if not mod_revision:
        return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}


def _folder_unchanged(key: str, range_end: str, revision: int) -> dict[str, Any]:
    """Holds while nothing in the range changed after `revision`."""
    return {"key": b64(key), "range_end": range_end, "target": "MOD", "result": "LESS", "mod_revision": str(revision + 1)}


Plan = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (comparisons, operations) of one transaction


class EtcdStore(StateAdmin):
    """The admin side; also what EtcdReader loads through. Safe to share between threads."""

    def __init__(self, config: EtcdConfig, *, project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX):
        self.config = config
        self.prefix = config.prefix
        self.client = EtcdClient(config)
        self._namespace_prefix = project_namespace_prefix

    def close(self) -> None:
        self.client.close()

    def _key(self, folder: str, name: str) -> str:
        return f"{self.prefix}{folder}{name}"

    # ---- reads ----

    def load_state(self) -> FleetState:
        """Everything under the prefix, at one revision."""
        revision, kvs = self.client.range(self.prefix)
        state = FleetState(revision)
        for kv in kvs:
            state.apply(self.prefix, False, kv)
        return state

    def load_snapshot(self, now: float | None = None) -> Snapshot:
        return self.load_state().snapshot(time.time() if now is None else now, self._namespace_prefix)

    def _folder(self, kind: Kind[Obj]) -> tuple[int, dict[str, Obj]]:
        revision, kvs = self.client.range(self._key(kind.folder, ""))
        return revision, {obj.name: obj for obj in (kind.decode(kv.key.rpartition("/")[2], kv.value, kv.mod_revision)
                                                     for kv in kvs)}

    def _get(self, kind: Kind[Obj], name: str) -> Obj:
        if isinstance(name, str) and DNS_SUBDOMAIN.match(name):
            answer = self.client.call("kv/range", {"key": b64(self._key(kind.folder, name))})
            for raw in answer.get("kvs", ()):
                obj: Obj = kind.decode(name, unb64(raw.get("value", "")), int(raw["mod_revision"]))
                if isinstance(obj, AccessKey):
                    return replace(obj, last_activity=self._activity(name))
                return obj
        raise NotFoundError(f"{kind.what} {name!r} does not exist")

    def _activity(self, name: str) -> float | None:
        answer = self.client.call("kv/range", {"key": b64(self._key(ACTIVITY, name))})
        return next((float(orjson.loads(unb64(raw["value"]))) for raw in answer.get("kvs", ())), None)

    def get_user(self, name: str) -> User:
        return self._get(USERS, name)

    def list_users(self) -> list[User]:
        return sorted(self._folder(USERS)[1].values(), key=lambda user: user.name)

    def get_team(self, name: str) -> Team:
        return self._get(TEAMS, name)

    def list_teams(self) -> list[Team]:
        return sorted(self._folder(TEAMS)[1].values(), key=lambda team: team.name)

    def get_access_key(self, name: str) -> AccessKey:
        return self._get(ACCESS_KEYS, name)

    def list_access_keys(self) -> list[AccessKey]:
        return self.load_state().access_keys()

    def list_namespace_activity(self) -> list[NamespaceActivity]:
        return list(dict(sorted(self.load_state().namespaces.items())).values())

    # ---- writes ----

    def _transact(self, plan: Callable[[], Plan]) -> int:
        """Run the transaction `plan` makes from fresh reads until its comparisons hold; its revision."""
        for _ in range(TXN_ATTEMPTS):
            step: Plan = plan()
            succeeded, revision, _ = self.client.txn(*step)
            if succeeded:
                return revision
        raise ConflictError("the state store kept changing under this write; try again")

    def _create(self, kind: Kind[Obj], obj: Obj, also: Callable[[], list[dict[str, Any]]] = list) -> Obj:
        key = self._key(kind.folder, obj.name)

        def plan() -> Plan:
            compare: list[dict[str, Any]] = also()
            answer = self.client.call("kv/range", {"key": b64(key), "count_only": True})
            if int(answer.get("count", 0)):
                raise AlreadyExistsError(f"{kind.what} {obj.name!r} already exists")
            return [*compare, _unchanged(key, 0)], [_put(key, kind.encode(obj))]
        return replace(obj, resource_version=self._transact(plan))

    def _members_exist(self, members: Iterable[str]) -> list[dict[str, Any]]:
        """Comparisons that hold while every one of `members` is the user read now; InvalidError for one that is not."""
        compare = []
        for member in sorted(set(members)):
            try:
                user = self.get_user(member)
            except NotFoundError:
                raise InvalidError(f"team member {member!r} is not a user", "members") from None
            compare.append(_unchanged(self._key(USERS.folder, member), user.resource_version))
        return compare

    def _update_checked(self, what: str, name: str, expected_version: int | None, fields: Mapping[str, Any]) -> Any:
        kind: Kind[Any] = _KINDS[what]
        result: list[Any] = []

        def plan() -> Plan:
            obj = self._get(kind, name)
            check_version(obj, kind.what, expected_version)
            updated = replace(obj, **fields)
            result[:] = [obj, updated]
            if updated == obj:
                return [], []  # nothing to write: an empty transaction succeeds
            compare: list[dict[str, Any]] = []
            if isinstance(updated, Team) and isinstance(obj, Team):
                compare = self._members_exist(set(updated.members) - set(obj.members))
            return [*compare, _unchanged(self._key(kind.folder, name), obj.resource_version)], \
                [_put(self._key(kind.folder, name), kind.encode(updated))]
        revision = self._transact(plan)
        obj, updated = result
        return obj if updated == obj else replace(updated, resource_version=revision)

    def _delete_with(self, kind: Kind[Obj], name: str, expected_version: int | None,
                     owned: Callable[[Obj], Plan]) -> Obj:
        """Delete the object and what `owned(obj)` says depends on it, in one transaction."""
        result: list[Obj] = []

        def plan() -> Plan:
            obj = self._get(kind, name)
            check_version(obj, kind.what, expected_version)
            result[:] = [obj]
            dependents: Plan = owned(obj)
            key = self._key(kind.folder, name)
            return [*dependents[0], _unchanged(key, obj.resource_version)], [*dependents[1], _delete(key)]
        revision = self._transact(plan)
        return replace(result[0], resource_version=revision)

    def _keys_of(self, owner: str, name: str) -> Plan:
        """The deletion of every access key of user or team `name`, holding while no key changed since read."""
        folder = self._key(ACCESS_KEYS.folder, "")
        revision, keys = self._folder(ACCESS_KEYS)
        mine = [key for key in keys.values() if getattr(key, owner) == name]
        return ([_folder_unchanged(folder, prefix_end(folder), revision)],
                [op for key in mine for op in (_delete(self._key(ACCESS_KEYS.folder, key.name)),
                                               _delete(self._key(ACTIVITY, key.name)))])

    def import_object(self, kind: Kind[Obj], obj: Obj) -> None:
        """Store `obj` as it is (uid, creation time and all) unless etcd holds it already (same uid);
        AlreadyExistsError if another object holds its name. What `fastproxy state migrate` writes."""
        try:
            stored = self._get(kind, obj.name)
        except NotFoundError:
            self._create(kind, obj)
            return
        if stored.uid != obj.uid:
            raise AlreadyExistsError(f"{kind.what} {obj.name!r} exists in etcd as another object (uid {stored.uid})")

    # users

    def create_user(self, name: str, *, username: str = "", display_name: str = "", email: str = "",
                    subject: str = "", groups: Iterable[str] = (), disabled: bool = False, description: str = "",
                    labels: Mapping[str, str] = EMPTY, annotations: Mapping[str, str] = EMPTY,
                    password_hash: str = "") -> User:
        user = new_user(name, {"username": username, "display_name": display_name, "email": email,
                               "subject": subject, "groups": groups, "disabled": disabled, "description": description,
                               "labels": labels, "annotations": annotations, "password_hash": password_hash})
        return self._create(USERS, user)

    def delete_user(self, name: str, *, expected_version: int | None = None) -> User:
        def owned(user: User) -> Plan:
            compare, operations = self._keys_of("user", name)
            teams_folder = self._key(TEAMS.folder, "")
            revision, teams = self._folder(TEAMS)
            for team in teams.values():
                if name in team.members:
                    left = replace(team, members=tuple(member for member in team.members if member != name))
                    operations.append(_put(self._key(TEAMS.folder, team.name), TEAMS.encode(left)))
            return [*compare, _folder_unchanged(teams_folder, prefix_end(teams_folder), revision)], operations
        return self._delete_with(USERS, name, expected_version, owned)

    # teams

    def create_team(self, name: str, *, members: Iterable[str] = (), groups: Iterable[str] = (), display_name: str = "",
                    description: str = "", labels: Mapping[str, str] = EMPTY,
                    annotations: Mapping[str, str] = EMPTY) -> Team:
        team = new_team(name, {"members": members, "groups": groups, "display_name": display_name,
                               "description": description, "labels": labels, "annotations": annotations})
        return self._create(TEAMS, team, lambda: self._members_exist(team.members))

    def delete_team(self, name: str, *, expected_version: int | None = None) -> Team:
        return self._delete_with(TEAMS, name, expected_version, lambda team: self._keys_of("team", name))

    # access keys

    def create_access_key(self, *, user: str | None = None, team: str | None = None, name: str | None = None,
                          type: str = "User", display_name: str = "", ttl: int = 0,
                          ttl_after_last_activity: bool = False, scope: Any = None,
                          now: float | None = None, description: str = "", labels: Mapping[str, str] = EMPTY,
                          annotations: Mapping[str, str] = EMPTY) -> tuple[AccessKey, str]:
        key, secret = new_access_key(user, team, name, type, ttl, ttl_after_last_activity, now, {
            "display_name": display_name, "scope": scope, "description": description, "labels": labels,
            "annotations": annotations})
        owner = user if user is not None else team
        name = key.name
        kind: Kind[Any] = USERS if user is not None else TEAMS
        assert owner is not None  # check_new_key

        def owner_unchanged() -> list[dict[str, Any]]:
            return [_unchanged(self._key(kind.folder, owner), self._get(kind, owner).resource_version)]
        return self._create(ACCESS_KEYS, key, owner_unchanged), secret

    def delete_access_key(self, name: str, *, expected_version: int | None = None) -> AccessKey:
        """One round trip, not a read of the key and its activity then a transaction: a revocation is the
        write a fleet waits for. The key and its activity go while the key exists (and is at
        `expected_version`); etcd answers with what it deleted, or, refused, with the key as it is."""
        if not (isinstance(name, str) and DNS_SUBDOMAIN.match(name)):
            raise NotFoundError(f"{ACCESS_KEYS.what} {name!r} does not exist")
        key = self._key(ACCESS_KEYS.folder, name)
        compare = [{"key": b64(key), "target": "CREATE", "result": "GREATER", "create_revision": "0"}]
        if expected_version is not None:
            compare.append({"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(expected_version)})
        deleted, revision, answers = self.client.txn(
            compare, [_delete(key, answer_with_it=True), _delete(self._key(ACTIVITY, name), answer_with_it=True)],
            [{"request_range": {"key": b64(key)}}])
        if not deleted:
            stored = answers[0].get("response_range", {}).get("kvs", [])
            if not stored:
                raise NotFoundError(f"{ACCESS_KEYS.what} {name!r} does not exist")
            check_version(_decoded_key(name, stored[0]), ACCESS_KEYS.what, expected_version)
            raise AssertionError("etcd refused comparisons that hold")  # check_version raised: the version differs
        previous = [answer.get("response_delete_range", {}).get("prev_kvs", []) for answer in answers]
        activity = float(orjson.loads(unb64(previous[1][0]["value"]))) if previous[1] else None
        return replace(_decoded_key(name, previous[0][0]), last_activity=activity, resource_version=revision)

    def revoke_token(self, jti: str, expires_at: float) -> None:
        check_revoked_token(jti, expires_at)
        lease = self.client.grant_lease(max(1, math.ceil(expires_at - time.time())))
        self.client.txn([], [_put(self._key(REVOKED, jti), orjson.dumps(expires_at), lease)])

    # activity: the newer of stored and written wins

    def create_virtual_cluster_instance(self, namespace: str, name: str, *, cluster: str, server: str = "",
                                        ca_data: str = "", token: str = "", display_name: str = "",
                                        description: str = "", labels: Mapping[str, str] = EMPTY,
                                        annotations: Mapping[str, str] = EMPTY) -> VirtualClusterInstance:
        instance = new_instance(namespace, name, {
            "cluster": cluster, "server": server, "ca_data": ca_data, "token": token, "display_name": display_name,
            "description": description, "labels": labels, "annotations": annotations})
        key = self._key(INSTANCES.folder, f"{namespace}/{name}")

        def plan() -> Plan:
            if int(self.client.call("kv/range", {"key": b64(key), "count_only": True}).get("count", 0)):
                raise AlreadyExistsError(f"virtual cluster instance {namespace}/{name} already exists")
            return [_unchanged(key, 0)], [_put(key, INSTANCES.encode(instance))]
        return replace(instance, resource_version=self._transact(plan))

    def list_virtual_cluster_instances(self) -> list[VirtualClusterInstance]:
        folder = self._key(INSTANCES.folder, "")
        _, kvs = self.client.range(folder)
        instances = [INSTANCES.decode(kv.key[len(folder):], kv.value, kv.mod_revision) for kv in kvs]
        return sorted(instances, key=lambda instance: (instance.namespace, instance.name))

    def _instance(self, namespace: str, name: str, expected_version: int | None) -> VirtualClusterInstance:
        if isinstance(namespace, str) and isinstance(name, str) and DNS_SUBDOMAIN.match(namespace) \
                and DNS_SUBDOMAIN.match(name):
            answer = self.client.call("kv/range", {"key": b64(self._key(INSTANCES.folder, f"{namespace}/{name}"))})
            for raw in answer.get("kvs", ()):
                instance: VirtualClusterInstance = INSTANCES.decode(f"{namespace}/{name}", unb64(raw.get("value", "")),
                                                                    int(raw["mod_revision"]))
                check_version(instance, "virtual cluster instance", expected_version)
                return instance
        raise NotFoundError(f"virtual cluster instance {namespace}/{name} does not exist")

    def update_virtual_cluster_instance(self, namespace: str, name: str, *, expected_version: int | None = None,
                                        **changes: Any) -> VirtualClusterInstance:
        fields = checked_changes(INSTANCE_FIELDS, changes, "virtual cluster instance")
        key = self._key(INSTANCES.folder, f"{namespace}/{name}")
        result: list[VirtualClusterInstance] = []

        def plan() -> Plan:
            current = self._instance(namespace, name, expected_version)
            updated = check_instance(replace(current, **fields))
            result[:] = [current, updated]
            if updated == current:
                return [], []  # nothing to write: an empty transaction succeeds
            return [_unchanged(key, current.resource_version)], [_put(key, INSTANCES.encode(updated))]
        revision = self._transact(plan)
        current, updated = result
        return current if updated == current else replace(updated, resource_version=revision)

    def delete_virtual_cluster_instance(self, namespace: str, name: str, *,
                                        expected_version: int | None = None) -> VirtualClusterInstance:
        key = self._key(INSTANCES.folder, f"{namespace}/{name}")
        result: list[VirtualClusterInstance] = []

        def plan() -> Plan:
            current = self._instance(namespace, name, expected_version)
            result[:] = [current]
            return [_unchanged(key, current.resource_version)], [_delete(key)]
        revision = self._transact(plan)
        return replace(result[0], resource_version=revision)

    # OpenID Connect grants: by the digest of their secret, leased until they expire; taken once.

    def put_grant(self, digest: bytes, kind: str, data: str, expires_at: float) -> None:
        lease = self.client.grant_lease(max(1, math.ceil(expires_at - time.time())))
        value = orjson.dumps({"kind": kind, "data": data, "expires_at": expires_at})
        self.client.txn([], [_put(self._key(GRANTS, digest.hex()), value, lease)])

    def _grant(self, digest: bytes, kind: str) -> tuple[dict[str, Any], int] | None:
        answer = self.client.call("kv/range", {"key": b64(self._key(GRANTS, digest.hex()))})
        for raw in answer.get("kvs", ()):
            grant = orjson.loads(unb64(raw.get("value", "")))
            if grant.get("kind") == kind:
                return grant, int(raw["mod_revision"])
        return None

    def take_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        found = self._grant(digest, kind)
        if found is None:
            return None
        grant, revision = found
        key = self._key(GRANTS, digest.hex())
        taken, _, _ = self.client.txn([_unchanged(key, revision)], [_delete(key)])  # of two takers, one wins
        return grant["data"] if taken and grant["expires_at"] > now else None

    def read_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        found = self._grant(digest, kind)
        return found[0]["data"] if found is not None and found[0]["expires_at"] > now else None

    def record_activity(self, batch: Mapping[str, float]) -> None:
        self._record_newer(ACTIVITY, {name: (when, orjson.dumps(when)) for name, when in batch.items()})

    def record_namespace_activity(self, batch: Mapping[tuple[str, str], NamespaceActivity]) -> None:
        self._record_newer(NAMESPACE_ACTIVITY, {
            f"{activity.cluster}/{activity.namespace}": (activity.last_activity, orjson.dumps(
                {f.name: getattr(activity, f.name) for f in dataclasses.fields(activity) if f.name not in ("cluster", "namespace")}))
            for activity in batch.values()})

    def _record_newer(self, folder: str, batch: Mapping[str, tuple[float, bytes]]) -> None:
        """Write each (time, value) whose time is newer than the stored one's, TXN_KEYS at a time."""
        names = sorted(batch)
        for start in range(0, len(names), TXN_KEYS):
            self._transact(functools.partial(self._newer_plan, folder, batch, names[start:start + TXN_KEYS]))

    def _newer_plan(self, folder: str, batch: Mapping[str, tuple[float, bytes]], names: list[str]) -> Plan:
        _, _, answers = self.client.txn([], [{"request_range": {"key": b64(self._key(folder, name))}} for name in names])
        compare: list[dict[str, Any]] = []
        operations: list[dict[str, Any]] = []
        for name, answer in zip(names, answers):
            stored = answer.get("response_range", {}).get("kvs", [])
            when, value = batch[name]
            old = _stored_time(unb64(stored[0]["value"])) if stored else None
            if old is None or old < when:
                compare.append(_unchanged(self._key(folder, name), int(stored[0]["mod_revision"]) if stored else 0))
                operations.append(_put(self._key(folder, name), value))
        return compare, operations


def _decoded_key(name: str, raw: dict[str, Any]) -> AccessKey:
    """An access key as etcd's JSON answers hold it (base64 value, decimal mod_revision)."""
    return ACCESS_KEYS.decode(name, unb64(raw.get("value", "")), int(raw["mod_revision"]))


def _stored_time(value: bytes) -> float:
    stored = orjson.loads(value)
    return float(stored["last_activity"] if isinstance(stored, dict) else stored)




class Link(enum.Enum):
    """How a reader stands with etcd."""

    WATCHING = "watching"      # the watch is in place: the snapshot follows every change
    UNREACHABLE = "unreachable"  # serving the last snapshot, reconnecting
    STALE = "stale"            # unreachable for longer than max_staleness: state-store keys refused


def link_after(link: Link, silent_for: float, max_staleness: float) -> Link:
    """The link state once no contact came for `silent_for` seconds (0: just heard from etcd)."""
    if silent_for <= 0:
        return Link.WATCHING
    if max_staleness and silent_for >= max_staleness:
        return Link.STALE
    return Link.UNREACHABLE if link is Link.WATCHING else link


class EtcdReader(StateReader):
    """Keeps a snapshot current from a watch on the prefix, run on a thread of its own.

    The thread only reads etcd; decoded changes are applied on the loop (`_apply`), so the state
    is touched by one thread. Activity is coalesced here and written every ACTIVITY_FLUSH_SECONDS.
    """

    def __init__(self, store: EtcdStore):
        try:
            state = store.load_state()
        except BaseException:
            store.close()
            raise
        self.store = store
        self.state = state
        self.prefix_ns = store._namespace_prefix
        super().__init__(state.snapshot(time.time(), self.prefix_ns))
        self.link = Link.WATCHING
        self.last_contact = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.writer: ThreadPoolExecutor | None = None
        self.pending_keys: dict[str, float] = {}
        self.pending_namespaces: dict[tuple[str, str], NamespaceActivity] = {}
        self.reloads = 0  # full loads after a compaction
        self.flushed_at = time.monotonic()
        self.writes = 0  # activity transactions written: what the write-rate measurement reads
        self._logged_at = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastproxy-etcd-activity")
        self.thread = threading.Thread(target=self._watch, args=(self.state.revision,), name="fastproxy-etcd-watch",
                                       daemon=True)
        self.thread.start()
        self.timer = loop.call_later(1.0, self._tick)

    def poll_now(self) -> None:
        pass  # the watch tells of every change as it happens

    # ---- on the watch thread ----

    def _watch(self, revision: int) -> None:
        delay = BACKOFF[0]
        idle = max(1.0, min(10.0, (self.store.config.max_staleness or 30.0) / 3))
        while not self.stop.is_set():
            try:
                for events in self.store.client.watch(self.store.prefix, revision + 1, idle):
                    self.last_contact, delay = time.monotonic(), BACKOFF[0]
                    if events:
                        revision = events[-1].kv.mod_revision
                    self._to_loop(self._apply, events)
                    if self.stop.is_set():
                        return
                self.last_contact = time.monotonic()
            except CompactedError as error:
                log.warning("state store: %s; loading everything again", error)
                try:
                    state = self.store.load_state()
                except UnavailableError:
                    continue
                revision = state.revision
                self._to_loop(self._reloaded, state)
            except UnavailableError as error:
                self._to_loop(self._unreachable, str(error))
                self.stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF[1])

    def _to_loop(self, call: Callable[..., None], *args: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(call, *args)
            except RuntimeError:
                pass  # the loop closed meanwhile

    # ---- on the loop ----

    def _apply(self, events: list[WatchEvent]) -> None:
        self._contact()
        if not events:
            return
        keys: set[str] = set()
        rebuild = self.link is Link.STALE
        lists_changed = False
        for event in events:
            folder, name = self.state.apply(self.store.prefix, event.deleted, event.kv)
            if folder == ACCESS_KEYS.folder or (folder == ACTIVITY and self._expires_with_activity(name)):
                keys.add(name)  # other activity waits for the next full build (refresh_at), as SQLite's does
            elif folder in (USERS.folder, TEAMS.folder, INSTANCES.folder):
                rebuild = True  # identities of many keys may change; instances are rare and few
            elif folder in (REVOKED, NAMESPACE_ACTIVITY):
                lists_changed = True
        self.state.revision = events[-1].kv.mod_revision
        if rebuild:
            self._publish_state()
            return
        # Key changes alone (a revocation, a new key, activity) re-resolve only those keys; a batch of
        # other gateways' activity, the most frequent event of a fleet, copies nothing at all.
        now, stored = time.time(), self.state.objects[ACCESS_KEYS.folder]
        snapshot = with_keys_changed(self.snapshot, self.state.revision, [self.state.access_key(name) for name in keys
                                                                          if name in stored],
                                     [name for name in keys if name not in stored], now,
                                     project_namespace_prefix=self.prefix_ns)
        # The lists are rebuilt only when they changed. A revoked token id whose expiry passed stays listed
        # until then, its lease's end or the next full build: harmless, an expired token is refused anyway.
        self.publish(self.state.with_lists(snapshot, now) if lists_changed else snapshot)

    def _expires_with_activity(self, name: str) -> bool:
        key = self.state.objects[ACCESS_KEYS.folder].get(name)
        return key is not None and key.ttl_after_last_activity

    def _reloaded(self, state: FleetState) -> None:
        self.state, self.reloads = state, self.reloads + 1
        self._contact()
        self._publish_state()

    def _publish_state(self) -> None:
        snapshot = self.state.snapshot(time.time(), self.prefix_ns)
        self.publish(replace(snapshot, keys={}) if self.link is Link.STALE else snapshot)

    def _contact(self) -> None:
        if self.link is not Link.WATCHING:
            log.info("state store: etcd reachable again, following it from revision %d", self.state.revision)
            was_stale = self.link is Link.STALE
            self.link, self.failing = Link.WATCHING, False
            if was_stale:
                self._publish_state()

    def _unreachable(self, cause: str) -> None:
        self._update_link()
        now = time.monotonic()
        if now - self._logged_at >= UNREACHABLE_LOG_SECONDS:
            self._logged_at = now
            log.error("state store: %s; serving the snapshot of revision %d, %.0f s old", cause, self.state.revision,
                      now - self.last_contact)

    def _update_link(self) -> None:
        silent_for = time.monotonic() - self.last_contact
        link = link_after(self.link, silent_for, self.store.config.max_staleness)
        if link is self.link:
            return
        self.link, self.failing = link, link is not Link.WATCHING
        if link is Link.STALE:
            log.error("state store: no contact with etcd for %.0f s, more than [state] max_staleness: "
                      "refusing state-store access keys until it is back", silent_for)
            self._publish_state()

    def _tick(self) -> None:
        assert self.loop is not None
        self.timer = self.loop.call_later(1.0, self._tick)
        if self.link is not Link.WATCHING:
            self._update_link()
        if time.time() >= self.snapshot.refresh_at:
            self._publish_state()  # activity-based expiry needs no change to be seen
        if time.monotonic() - self.flushed_at >= ACTIVITY_FLUSH_SECONDS:
            self._flush()

    # ---- activity ----

    def record_activity(self, batch: Mapping[str, float]) -> None:
        for name, when in batch.items():
            self.pending_keys[name] = max(when, self.pending_keys.get(name, when))
        if self.writer is None:
            self._flush()

    def record_namespace_activity(self, batch: Mapping[tuple[str, str], NamespaceActivity]) -> None:
        for where, activity in batch.items():
            old = self.pending_namespaces.get(where)
            if old is None or old.last_activity < activity.last_activity:
                self.pending_namespaces[where] = activity
        if self.writer is None:
            self._flush()

    def _flush(self) -> None:
        self.flushed_at = time.monotonic()
        if not (self.pending_keys or self.pending_namespaces):
            return
        keys, self.pending_keys = self.pending_keys, {}
        namespaces, self.pending_namespaces = self.pending_namespaces, {}
        if self.writer is None:
            self._write_activity(keys, namespaces)
        else:
            self.writer.submit(self._write_activity, keys, namespaces)

    def _write_activity(self, keys: dict[str, float], namespaces: dict[tuple[str, str], NamespaceActivity]) -> None:
        writes: list[tuple[Callable[[], None], str]] = [
            (lambda: self.store.record_activity(keys), "access key activity"),
            (lambda: self.store.record_namespace_activity(namespaces), "namespace activity")]
        for (write, what), batch in zip(writes, (keys, namespaces)):
            if batch:
                try:
                    write()
                    self.writes += 1
                except Exception as error:
                    log.warning("%s not recorded: %s", what, error)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stop.set()
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        self._flush()  # what is still pending, in place
        self.store.close()
        super().close()
