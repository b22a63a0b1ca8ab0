"""The SQLite state store: one file shared by every worker process, in WAL mode.

`SqliteStore` is the admin side (and the primitives the reader uses); `SqliteReader` is the
data path's side: it polls `generations` off the event loop every POLL_INTERVAL, and at once
when `wait_for` waits for a version it has not seen yet.

Every write except last-activity updates bumps `meta.generation` (by trigger, so no write path
can forget it); `generations` reads that one row. Activity is left out so that the batched
activity writes do not make every worker reload its snapshot. The last statement of every write
stamps the objects it wrote with the generation it ends at (`_stamp`); resource_version is left out
of the triggers too, so that the stamp does not move the generation past itself.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import orjson

from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX
from .base import (
    EMPTY,
    INSTANCE_FIELDS,
    AccessKey,
    AlreadyExistsError,
    InvalidError,
    NamespaceActivity,
    NotFoundError,
    Snapshot,
    StateAdmin,
    StateReader,
    StoreError,
    Team,
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
)

log = logging.getLogger("fastproxy.store")

POLL_INTERVAL = 0.25  # how often a reader asks the file whether anything changed


def _bump_on_change(table: str, update_columns: str = "") -> tuple[str, ...]:
    update = f"UPDATE OF {update_columns}" if update_columns else "UPDATE"
    return tuple(f"CREATE TRIGGER {table}_{label} AFTER {event} ON {table} "
                 "BEGIN UPDATE meta SET generation = generation + 1; END"
                 for label, event in (("insert", "INSERT"), ("update", update), ("delete", "DELETE")))


# A uuid4 in SQL, for the rows already there when migration 2 adds the uid column.
_UUID4_SQL = ("lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-' || "
              "substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))")


def _add_metadata(table: str, bumping_columns: str) -> tuple[str, ...]:
    """Migration 2 of one table: the object metadata columns, a uid and resource version for the rows
    already there, and the update trigger again, now on `bumping_columns` only (not resource_version)."""
    return (f"DROP TRIGGER {table}_update",
            *(f"ALTER TABLE {table} ADD COLUMN {column}" for column in (
                "uid TEXT NOT NULL DEFAULT ''", "labels TEXT NOT NULL DEFAULT '{}'",
                "annotations TEXT NOT NULL DEFAULT '{}'", "description TEXT NOT NULL DEFAULT ''",
                "resource_version INTEGER NOT NULL DEFAULT 0")),
            f"UPDATE {table} SET uid = {_UUID4_SQL}, resource_version = (SELECT generation FROM meta)",
            f"CREATE TRIGGER {table}_update AFTER UPDATE OF {bumping_columns} ON {table} "
            "BEGIN UPDATE meta SET generation = generation + 1; END")


# Migration N brings the schema from version N-1 to N (PRAGMA user_version); append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL)",
        "INSERT INTO meta VALUES (1, 0)",
        """CREATE TABLE users (name TEXT PRIMARY KEY, username TEXT NOT NULL, display_name TEXT NOT NULL,
            email TEXT NOT NULL, subject TEXT NOT NULL, groups TEXT NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL)""",
        "CREATE TABLE teams (name TEXT PRIMARY KEY, groups TEXT NOT NULL, created REAL NOT NULL)",
        """CREATE TABLE team_members (team TEXT NOT NULL REFERENCES teams(name) ON DELETE CASCADE,
            user TEXT NOT NULL REFERENCES users(name), PRIMARY KEY (team, user))""",
        """CREATE TABLE access_keys (name TEXT PRIMARY KEY, type TEXT NOT NULL, display_name TEXT NOT NULL,
            user TEXT REFERENCES users(name), team TEXT REFERENCES teams(name), digest BLOB NOT NULL UNIQUE,
            ttl INTEGER NOT NULL, ttl_after_last_activity INTEGER NOT NULL, disabled INTEGER NOT NULL,
            scope TEXT, created REAL NOT NULL, last_activity REAL,
            CHECK ((user IS NULL) != (team IS NULL)))""",
        "CREATE TABLE revoked_tokens (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
        *_bump_on_change("users"),
        *_bump_on_change("teams"),
        *_bump_on_change("team_members"),
        *_bump_on_change("access_keys", "name, type, display_name, user, team, digest, ttl, "
                                        "ttl_after_last_activity, disabled, scope, created"),
        *_bump_on_change("revoked_tokens"),
    ),
    (
        "ALTER TABLE teams ADD COLUMN display_name TEXT NOT NULL DEFAULT ''",
        *_add_metadata("users", "name, username, display_name, email, subject, groups, disabled, created, "
                                "uid, labels, annotations, description"),
        *_add_metadata("teams", "name, groups, created, display_name, uid, labels, annotations, description"),
        *_add_metadata("access_keys", "name, type, display_name, user, team, digest, ttl, ttl_after_last_activity, "
                                      "disabled, scope, created, uid, labels, annotations, description"),
    ),
    (   # sleep-mode activity, on a generation of its own: its frequent writes never reload the keys
        "ALTER TABLE meta ADD COLUMN activity_generation INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE namespace_activity (cluster TEXT NOT NULL, namespace TEXT NOT NULL,
            last_activity REAL NOT NULL, info TEXT NOT NULL, PRIMARY KEY (cluster, namespace))""",
    ),
    (   # password login: a user's argon2id hash; setting one is a change every worker reloads
        "ALTER TABLE users ADD COLUMN password_hash TEXT NOT NULL DEFAULT ''",
        "DROP TRIGGER users_update",
        "CREATE TRIGGER users_update AFTER UPDATE OF name, username, display_name, email, subject, groups, disabled, "
        "created, uid, labels, annotations, description, password_hash ON users "
        "BEGIN UPDATE meta SET generation = generation + 1; END",
    ),
    (   # /oidc/: authorization codes and tokens, shared by the workers; single use through take_grant
        """CREATE TABLE oidc_grants (digest BLOB PRIMARY KEY, kind TEXT NOT NULL, data TEXT NOT NULL,
            expires_at REAL NOT NULL)""",
    ),
    (   # virtual clusters created in the management API, namespaced: in their host namespace
        """CREATE TABLE virtual_cluster_instances (namespace TEXT NOT NULL, name TEXT NOT NULL, cluster TEXT NOT NULL,
            server TEXT NOT NULL, ca_data TEXT NOT NULL, token TEXT NOT NULL, display_name TEXT NOT NULL,
            description TEXT NOT NULL, created REAL NOT NULL, uid TEXT NOT NULL, labels TEXT NOT NULL,
            annotations TEXT NOT NULL, resource_version INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (namespace, name))""",
        *_bump_on_change("virtual_cluster_instances", "cluster, server, ca_data, token, display_name, description, "
                                                      "created, uid, labels, annotations"),
    ),
)

# The columns each kind is written with; resource_version is set apart, by _stamp.
_USER_COLUMNS = ("name", "username", "display_name", "email", "subject", "groups", "disabled", "created", "uid",
                 "labels", "annotations", "description", "password_hash")
_TEAM_COLUMNS = ("name", "groups", "created", "display_name", "uid", "labels", "annotations", "description")
_INSTANCE_COLUMNS = ("namespace", "name", "cluster", "server", "ca_data", "token", "display_name", "description",
                     "created", "uid", "labels", "annotations")
_KEY_COLUMNS = ("name", "type", "display_name", "user", "team", "digest", "ttl", "ttl_after_last_activity", "disabled",
                "scope", "created", "last_activity", "uid", "labels", "annotations", "description")

Obj = TypeVar("Obj", User, Team, AccessKey)


class SqliteStore(StateAdmin):
    """The admin side, and what SqliteReader reads and writes through.

    Safe to share between threads; after a fork each process opens its own connection."""

    def __init__(self, path: str | os.PathLike[str], *,
                 project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> None:
        self.path = os.fspath(path)
        self._prefix = project_namespace_prefix
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._inherited: list[sqlite3.Connection] = []
        self._pid = 0
        with self._transaction(write=True) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_MIGRATIONS):
                raise StoreError(f"state file {self.path} has schema version {version}, newer than "
                                 f"this fastproxy understands ({len(_MIGRATIONS)})")
            for migration in _MIGRATIONS[version:]:
                for statement in migration:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def _db(self) -> sqlite3.Connection:
        # A connection must not cross a fork: the child opens its own and never touches (not even
        # closes) the parent's, which it keeps referenced so that garbage collection does not close it.
        if self._connection is None or self._pid != os.getpid():
            if self._connection is not None:
                self._inherited.append(self._connection)
            try:
                connection = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                             check_same_thread=False)
                connection.execute("PRAGMA journal_mode = WAL")
            except sqlite3.Error as error:
                raise StoreError(f"cannot open state file {self.path}: {error}") from None
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA foreign_keys = ON")
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    # ---- the read-check-write path of every update and delete ----

    @contextmanager
    def _current(self, kind: _Kind[Obj], name: str,
                 expected_version: int | None) -> Iterator[tuple[sqlite3.Connection, Obj]]:
        """A write transaction and the object `name` as stored in it: NotFoundError if there is none,
        ConflictError if it is not at `expected_version` (None: any)."""
        with self._transaction(write=True) as db:
            obj = kind.read(db, name)
            check_version(obj, kind.what, expected_version)
            yield db, obj

    def _update_checked(self, what: str, name: str, expected_version: int | None, fields: Mapping[str, Any]) -> Any:
        kind: _Kind[Any] = _KINDS[what]
        with self._current(kind, name, expected_version) as (db, obj):
            updated = replace(obj, **fields)
            if updated == obj:
                return obj
            _update(db, kind.table, kind.columns, kind.row(updated))
            if kind.written is not None:
                kind.written(db, obj, updated)
            return replace(updated, resource_version=_stamp(db, kind.table, [name]))

    # ---- users ----

    def create_user(self, name: str, *, username: str = "", display_name: str = "", email: str = "",
                    subject: str = "", groups: Iterable[str] = (), disabled: bool = False, description: str = "",
                    labels: Mapping[str, str] = EMPTY, annotations: Mapping[str, str] = EMPTY,
                    password_hash: str = "") -> User:
        user = new_user(name, {"username": username, "display_name": display_name, "email": email,
                               "subject": subject, "groups": groups, "disabled": disabled, "description": description,
                               "labels": labels, "annotations": annotations, "password_hash": password_hash})
        with self._transaction(write=True) as db:
            if _exists(db, "users", name):
                raise AlreadyExistsError(f"user {name!r} already exists")
            _insert(db, "users", _USER_COLUMNS, _user_row(user))
            return replace(user, resource_version=_stamp(db, "users", [name]))

    def get_user(self, name: str) -> User:
        with self._transaction() as db:
            return _read_user(db, name)

    def list_users(self) -> list[User]:
        with self._transaction() as db:
            return [_user(row) for row in db.execute(f"{_USERS} ORDER BY name")]

    def delete_user(self, name: str, *, expected_version: int | None = None) -> User:
        with self._current(_USER_KIND, name, expected_version) as (db, user):
            teams = [team for (team,) in db.execute("SELECT team FROM team_members WHERE user = ?", (name,))]
            db.execute("DELETE FROM team_members WHERE user = ?", (name,))
            db.execute("DELETE FROM access_keys WHERE user = ?", (name,))
            db.execute("DELETE FROM users WHERE name = ?", (name,))
            return replace(user, resource_version=_stamp(db, "teams", teams))

    # ---- teams ----

    def create_team(self, name: str, *, members: Iterable[str] = (), groups: Iterable[str] = (), display_name: str = "",
                    description: str = "", labels: Mapping[str, str] = EMPTY,
                    annotations: Mapping[str, str] = EMPTY) -> Team:
        team = new_team(name, {"members": members, "groups": groups, "display_name": display_name,
                               "description": description, "labels": labels, "annotations": annotations})
        with self._transaction(write=True) as db:
            if _exists(db, "teams", name):
                raise AlreadyExistsError(f"team {name!r} already exists")
            _insert(db, "teams", _TEAM_COLUMNS, _team_row(team))
            _set_members(db, name, (), team.members)
            return replace(team, resource_version=_stamp(db, "teams", [name]))

    def get_team(self, name: str) -> Team:
        with self._transaction() as db:
            return _read_team(db, name)

    def list_teams(self) -> list[Team]:
        with self._transaction() as db:
            return _teams(db)

    def delete_team(self, name: str, *, expected_version: int | None = None) -> Team:
        with self._current(_TEAM_KIND, name, expected_version) as (db, team):
            db.execute("DELETE FROM access_keys WHERE team = ?", (name,))
            db.execute("DELETE FROM teams WHERE name = ?", (name,))  # and its memberships, by ON DELETE CASCADE
            return replace(team, resource_version=_generation(db))

    # ---- access keys ----

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
        with self._transaction(write=True) as db:
            table, what = ("users", "user") if user is not None else ("teams", "team")
            if not _exists(db, table, owner):
                raise NotFoundError(f"{what} {owner!r} does not exist")
            if _exists(db, "access_keys", name):
                raise AlreadyExistsError(f"access key {name!r} already exists")
            _insert(db, "access_keys", _KEY_COLUMNS, _key_row(key))
            return replace(key, resource_version=_stamp(db, "access_keys", [name])), secret

    def get_access_key(self, name: str) -> AccessKey:
        with self._transaction() as db:
            return _read_key(db, name)

    def list_access_keys(self) -> list[AccessKey]:
        with self._transaction() as db:
            return _access_keys(db)

    def delete_access_key(self, name: str, *, expected_version: int | None = None) -> AccessKey:
        with self._current(_KEY_KIND, name, expected_version) as (db, key):
            db.execute("DELETE FROM access_keys WHERE name = ?", (name,))
            return replace(key, resource_version=_generation(db))

    def revoke_token(self, jti: str, expires_at: float) -> None:
        check_revoked_token(jti, expires_at)
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO revoked_tokens VALUES (?, ?)", (jti, expires_at))

    def put_grant(self, digest: bytes, kind: str, data: str, expires_at: float) -> None:
        """Keep an OpenID Connect grant (code, access or refresh token) by its secret's digest; blocks.
        Expired grants go in the same transaction: the table holds only live ones."""
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM oidc_grants WHERE expires_at <= ?", (time.time(),))
            db.execute("INSERT INTO oidc_grants VALUES (?, ?, ?, ?)", (digest, kind, data, expires_at))

    def take_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        """Remove and return a live grant's data: of two workers taking it at once, one gets it."""
        with self._transaction(write=True) as db:
            row = db.execute("DELETE FROM oidc_grants WHERE digest = ? AND kind = ? RETURNING data, expires_at",
                             (digest, kind)).fetchone()
        return row[0] if row is not None and row[1] > now else None

    def read_grant(self, digest: bytes, kind: str, now: float) -> str | None:
        """A live grant's data, left in place (an access token, used many times)."""
        with self._transaction() as db:
            row = db.execute("SELECT data FROM oidc_grants WHERE digest = ? AND kind = ? AND expires_at > ?",
                             (digest, kind, now)).fetchone()
        return row[0] if row is not None else None

    def list_revoked_tokens(self) -> dict[str, float]:
        """Revoked token id -> when the token expires."""
        with self._transaction() as db:
            return dict(db.execute("SELECT jti, expires_at FROM revoked_tokens ORDER BY jti").fetchall())

    def record_activity(self, batch: Mapping[str, float]) -> None:
        """Write last-activity times (key name -> unix time) in one transaction; blocks."""
        if not batch:
            return
        with self._transaction(write=True) as db:
            db.executemany(
                "UPDATE access_keys SET last_activity = ?1 WHERE name = ?2 "
                "AND (last_activity IS NULL OR last_activity < ?1)",
                [(when, name) for name, when in batch.items()])

    def record_namespace_activity(self, batch: Mapping[tuple[str, str], NamespaceActivity]) -> None:
        """Write namespace activity in one transaction, keeping the newer of stored and written; blocks."""
        if not batch:
            return
        with self._transaction(write=True) as db:
            db.executemany(
                "INSERT INTO namespace_activity VALUES (?1, ?2, ?3, ?4) ON CONFLICT (cluster, namespace) DO UPDATE "
                "SET last_activity = ?3, info = ?4 WHERE last_activity < ?3",
                [(activity.cluster, activity.namespace, activity.last_activity, _json(_activity_info(activity)))
                 for activity in batch.values()])
            db.execute("UPDATE meta SET activity_generation = activity_generation + 1")

    def list_namespace_activity(self) -> list[NamespaceActivity]:
        with self._transaction() as db:
            return list(_activities(db).values())

    # ---- virtual cluster instances ----

    def create_virtual_cluster_instance(self, namespace: str, name: str, *, cluster: str, server: str = "",
                                        ca_data: str = "", token: str = "", display_name: str = "",
                                        description: str = "", labels: Mapping[str, str] = EMPTY,
                                        annotations: Mapping[str, str] = EMPTY) -> VirtualClusterInstance:
        instance = new_instance(namespace, name, {
            "cluster": cluster, "server": server, "ca_data": ca_data, "token": token, "display_name": display_name,
            "description": description, "labels": labels, "annotations": annotations})
        with self._transaction(write=True) as db:
            if _read_instance(db, namespace, name) is not None:
                raise AlreadyExistsError(f"virtual cluster instance {namespace}/{name} already exists")
            _insert(db, "virtual_cluster_instances", _INSTANCE_COLUMNS, _instance_row(instance))
            return _stamp_instance(db, instance)

    def list_virtual_cluster_instances(self) -> list[VirtualClusterInstance]:
        with self._transaction() as db:
            return _instances(db)

    def update_virtual_cluster_instance(self, namespace: str, name: str, *, expected_version: int | None = None,
                                        **changes: Any) -> VirtualClusterInstance:
        fields = checked_changes(INSTANCE_FIELDS, changes, "virtual cluster instance")
        with self._transaction(write=True) as db:
            current = _existing_instance(db, namespace, name, expected_version)
            updated = check_instance(replace(current, **fields))
            if updated == current:
                return current
            db.execute(f"UPDATE virtual_cluster_instances SET ({', '.join(_INSTANCE_COLUMNS[2:])}) = "
                       f"({', '.join('?' * (len(_INSTANCE_COLUMNS) - 2))}) WHERE namespace = ? AND name = ?",
                       (*_instance_row(updated)[2:], namespace, name))
            return _stamp_instance(db, updated)

    def delete_virtual_cluster_instance(self, namespace: str, name: str, *,
                                        expected_version: int | None = None) -> VirtualClusterInstance:
        with self._transaction(write=True) as db:
            current = _existing_instance(db, namespace, name, expected_version)
            db.execute("DELETE FROM virtual_cluster_instances WHERE namespace = ? AND name = ?", (namespace, name))
            return replace(current, resource_version=_generation(db))

    # ---- what the reader uses ----

    def load_snapshot(self, now: float | None = None) -> Snapshot:
        with self._transaction() as db:  # one read transaction: a consistent view of every table
            version, activity_version = _generations(db)
            users = [_user(row) for row in db.execute(_USERS)]
            teams = _teams(db)
            keys = _access_keys(db)
            revoked = [row[0] for row in db.execute("SELECT jti FROM revoked_tokens")]
            activities = _activities(db)
            instances = {(instance.namespace, instance.name): instance for instance in _instances(db)}
        snapshot = build_snapshot(version, users, teams, keys, revoked, time.time() if now is None else now,
                                  project_namespace_prefix=self._prefix)
        return replace(snapshot, activities=activities, activity_version=activity_version,
                       virtual_cluster_instances=instances)

    def with_fresh_activity(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with the activity stored now (the rest is unchanged: only activity was written)."""
        with self._transaction() as db:
            _, activity_version = _generations(db)
            activities = _activities(db)
        return replace(snapshot, activities=activities, activity_version=activity_version)

    def generations(self) -> tuple[int, int]:
        """(generation, activity generation): what a reader compares with its snapshot's; cheap to poll."""
        with self._lock:
            return _generations(self._db())

    def changed_since(self, version: int) -> bool:
        """Whether anything a snapshot holds, activity aside, changed after `version`; one row, cheap to poll."""
        return self.generations()[0] != version


class SqliteReader(StateReader):
    """Keeps a snapshot of a SqliteStore fresh by polling it on a thread of its own.

    The event loop never touches the database: polls, reloads and activity writes run on that
    one thread, so they also never overlap each other.
    """

    def __init__(self, store: SqliteStore):
        try:
            super().__init__(store.load_snapshot())
        except BaseException:
            store.close()
            raise
        self.store = store
        self.executor: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.polling = False
        self.poll_again = False  # asked to poll while a poll ran, which may have looked before the write

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastproxy-store")
        self.timer = loop.call_later(POLL_INTERVAL, self._poll)

    def poll_now(self) -> None:
        if self.timer is None:
            return  # not started (its first poll will look) or closed
        if self.polling:
            self.poll_again = True
            return
        self.timer.cancel()
        self._poll()

    def _poll(self) -> None:
        self.timer = self.loop.call_later(POLL_INTERVAL, self._poll)
        if self.polling:
            return  # the previous poll or reload is still running
        self.polling = True
        self.loop.run_in_executor(self.executor, self._fresh_snapshot, self.snapshot).add_done_callback(self._polled)

    def _fresh_snapshot(self, snapshot: Snapshot) -> Snapshot | None:
        """On the store thread: a new snapshot if anything changed or the old one is due; when only
        activity changed, the old one with the new activity."""
        version, activity_version = self.store.generations()
        if version != snapshot.version or time.time() >= snapshot.refresh_at:
            return self.store.load_snapshot()
        if activity_version != snapshot.activity_version:
            return self.store.with_fresh_activity(snapshot)
        return None

    def _polled(self, done: asyncio.Future[Snapshot | None]) -> None:
        self.polling = False
        snapshot = self._result(done)
        if snapshot is not None:
            self.publish(snapshot)
        if self.poll_again:
            self.poll_again = False
            self.poll_now()

    def _result(self, done: asyncio.Future[Snapshot | None]) -> Snapshot | None:
        """The poll's new snapshot, if any; on failure keep serving from the last good one, and say so once."""
        try:
            snapshot = done.result()
        except Exception as error:
            if not self.failing:
                log.error("state store %s cannot be read: %s", self.store.path, error)
                self.failing = True
            return None
        if self.failing:
            log.info("state store %s readable again", self.store.path)
            self.failing = False
        return snapshot

    def record_activity(self, batch: Mapping[str, float]) -> None:
        self._submit(self.store.record_activity, batch, "access key activity")

    def record_namespace_activity(self, batch: Mapping[tuple[str, str], NamespaceActivity]) -> None:
        self._submit(self.store.record_namespace_activity, batch, "namespace activity")

    def _submit(self, write: Callable[[Mapping[Any, Any]], None], batch: Mapping[Any, Any], what: str) -> None:
        """Run `write(batch)` on the store thread (in place before start and after close); a failure is logged."""
        if not batch:
            return
        if self.executor is None:
            _logging_failure(write, batch, what)
        else:
            self.executor.submit(_logging_failure, write, dict(batch), what)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.executor is not None:
            self.executor.shutdown(wait=True)  # the activity writes already submitted run first
            self.executor = None
        self.store.close()
        super().close()


def _logging_failure(write: Callable[[Mapping[Any, Any]], None], batch: Mapping[Any, Any], what: str) -> None:
    try:
        write(batch)
    except Exception as error:
        log.warning("%s not recorded: %s", what, error)


# ---- rows ----

def _select(table: str, columns: Sequence[str]) -> str:
    return f"SELECT {', '.join(columns)}, resource_version FROM {table}"


_USERS = _select("users", _USER_COLUMNS)
_TEAMS = _select("teams", _TEAM_COLUMNS)
_KEYS = _select("access_keys", _KEY_COLUMNS)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _generation(db: sqlite3.Connection) -> int:
    return _generations(db)[0]


def _generations(db: sqlite3.Connection) -> tuple[int, int]:
    generation, activity_generation = db.execute("SELECT generation, activity_generation FROM meta").fetchone()
    return int(generation), int(activity_generation)


_ACTIVITY_INFO = ("subject", "verb", "api_group", "resource", "subresource", "name", "virtual_cluster")


def _activity_info(activity: NamespaceActivity) -> dict[str, str]:
    return {field: getattr(activity, field) for field in _ACTIVITY_INFO}


def _activities(db: sqlite3.Connection) -> dict[tuple[str, str], NamespaceActivity]:
    rows = db.execute("SELECT cluster, namespace, last_activity, info FROM namespace_activity ORDER BY cluster, namespace")
    return {(cluster, namespace): NamespaceActivity(cluster, namespace, last_activity, **{
                field: value for field, value in orjson.loads(info).items() if field in _ACTIVITY_INFO})
            for cluster, namespace, last_activity, info in rows}


def _stamp(db: sqlite3.Connection, table: str, names: Iterable[str]) -> int:
    """The last statement of a write: give the objects it wrote the generation it ends at, and return that."""
    version = _generation(db)
    db.executemany(f"UPDATE {table} SET resource_version = ? WHERE name = ?", [(version, name) for name in names])
    return version


def _exists(db: sqlite3.Connection, table: str, name: Any) -> bool:
    return db.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone() is not None


def _insert(db: sqlite3.Connection, table: str, columns: Sequence[str], row: tuple[Any, ...]) -> None:
    db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", row)


def _update(db: sqlite3.Connection, table: str, columns: Sequence[str], row: tuple[Any, ...]) -> None:
    """Write every column of the row named row[0], but its name."""
    db.execute(f"UPDATE {table} SET ({', '.join(columns[1:])}) = ({', '.join('?' * (len(columns) - 1))}) WHERE name = ?",
               (*row[1:], row[0]))


def _fetch(db: sqlite3.Connection, query: str, name: str, what: str) -> tuple[Any, ...]:
    row: tuple[Any, ...] | None = None
    if isinstance(name, str):  # no object has any other name (and SQLite cannot bind most other values)
        row = db.execute(f"{query} WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"{what} {name!r} does not exist")
    return row


def _user_row(user: User) -> tuple[Any, ...]:
    return (user.name, user.username, user.display_name, user.email, user.subject, _json(user.groups), int(user.disabled),
            user.created, user.uid, _json(user.labels), _json(user.annotations), user.description, user.password_hash)


def _user(row: tuple[Any, ...]) -> User:
    (name, username, display_name, email, subject, groups, disabled, created, uid, labels, annotations, description,
     password_hash, version) = row
    return User(name, username, display_name, email, subject, tuple(orjson.loads(groups)), bool(disabled), created, uid,
                orjson.loads(labels), orjson.loads(annotations), description, version, password_hash)


def _read_user(db: sqlite3.Connection, name: str) -> User:
    return _user(_fetch(db, _USERS, name, "user"))


def _team_row(team: Team) -> tuple[Any, ...]:
    return (team.name, _json(team.groups), team.created, team.display_name, team.uid, _json(team.labels),
            _json(team.annotations), team.description)


def _team(row: tuple[Any, ...], members: Iterable[str]) -> Team:
    name, groups, created, display_name, uid, labels, annotations, description, version = row
    return Team(name, tuple(members), tuple(orjson.loads(groups)), created, display_name, uid, orjson.loads(labels),
                orjson.loads(annotations), description, version)


def _read_team(db: sqlite3.Connection, name: str) -> Team:
    row = _fetch(db, _TEAMS, name, "team")
    return _team(row, (user for (user,) in db.execute("SELECT user FROM team_members WHERE team = ? ORDER BY user", (name,))))


def _teams(db: sqlite3.Connection) -> list[Team]:
    members: dict[str, list[str]] = {}
    for team, user in db.execute("SELECT team, user FROM team_members ORDER BY user"):
        members.setdefault(team, []).append(user)
    return [_team(row, members.get(row[0], ())) for row in db.execute(f"{_TEAMS} ORDER BY name")]


def _set_members(db: sqlite3.Connection, team: str, old: Iterable[str], new: Iterable[str]) -> None:
    """Make the team's members `new` instead of `old`; InvalidError for a new one that is not a user."""
    old, new = set(old), set(new)
    added = sorted(new - old)
    for member in added:
        if not _exists(db, "users", member):
            raise InvalidError(f"team member {member!r} is not a user", "members")
    db.executemany("DELETE FROM team_members WHERE team = ? AND user = ?", [(team, member) for member in old - new])
    db.executemany("INSERT INTO team_members VALUES (?, ?)", [(team, member) for member in added])


def _key_row(key: AccessKey) -> tuple[Any, ...]:
    return (key.name, key.type, key.display_name, key.user, key.team, key.digest, key.ttl, int(key.ttl_after_last_activity),
            int(key.disabled), None if key.scope is None else _json(key.scope), key.created, key.last_activity, key.uid,
            _json(key.labels), _json(key.annotations), key.description)


def _access_key(row: tuple[Any, ...]) -> AccessKey:
    (name, type_, display_name, user, team, digest, ttl, after_activity, disabled, scope, created, last_activity, uid,
     labels, annotations, description, version) = row
    return AccessKey(name, type_, user, team, digest, display_name, ttl, bool(after_activity), bool(disabled),
                     None if scope is None else orjson.loads(scope), created, last_activity, uid, orjson.loads(labels),
                     orjson.loads(annotations), description, version)


def _read_key(db: sqlite3.Connection, name: str) -> AccessKey:
    return _access_key(_fetch(db, _KEYS, name, "access key"))


def _access_keys(db: sqlite3.Connection) -> list[AccessKey]:
    return [_access_key(row) for row in db.execute(f"{_KEYS} ORDER BY name")]


_INSTANCES = _select("virtual_cluster_instances", _INSTANCE_COLUMNS)


def _instance_row(instance: VirtualClusterInstance) -> tuple[Any, ...]:
    return (instance.namespace, instance.name, instance.cluster, instance.server, instance.ca_data, instance.token,
            instance.display_name, instance.description, instance.created, instance.uid, _json(instance.labels),
            _json(instance.annotations))


def _instance(row: tuple[Any, ...]) -> VirtualClusterInstance:
    (namespace, name, cluster, server, ca_data, token, display_name, description, created, uid, labels, annotations,
     version) = row
    return VirtualClusterInstance(namespace, name, cluster, server, ca_data, token, display_name, description, created,
                                  uid, orjson.loads(labels), orjson.loads(annotations), version)


def _instances(db: sqlite3.Connection) -> list[VirtualClusterInstance]:
    return [_instance(row) for row in db.execute(f"{_INSTANCES} ORDER BY namespace, name")]


def _read_instance(db: sqlite3.Connection, namespace: str, name: str) -> VirtualClusterInstance | None:
    if not isinstance(namespace, str) or not isinstance(name, str):
        return None
    row = db.execute(f"{_INSTANCES} WHERE namespace = ? AND name = ?", (namespace, name)).fetchone()
    return None if row is None else _instance(row)


def _existing_instance(db: sqlite3.Connection, namespace: str, name: str,
                       expected_version: int | None) -> VirtualClusterInstance:
    instance = _read_instance(db, namespace, name)
    if instance is None:
        raise NotFoundError(f"virtual cluster instance {namespace}/{name} does not exist")
    check_version(instance, "virtual cluster instance", expected_version)
    return instance


def _stamp_instance(db: sqlite3.Connection, instance: VirtualClusterInstance) -> VirtualClusterInstance:
    """As _stamp, for the one table whose objects are named by namespace and name."""
    version = _generation(db)
    db.execute("UPDATE virtual_cluster_instances SET resource_version = ? WHERE namespace = ? AND name = ?",
               (version, instance.namespace, instance.name))
    return replace(instance, resource_version=version)


@dataclass(frozen=True)
class _Kind(Generic[Obj]):
    """How one kind of object is stored: what updates and deletes read and write through."""

    what: str                                             # as refusals name it: "access key"
    table: str
    columns: tuple[str, ...]
    row: Callable[[Obj], tuple[Any, ...]]
    read: Callable[[sqlite3.Connection, str], Obj]        # NotFoundError if there is none
    # what else an update writes, given the object before and after (a team's members)
    written: Callable[[sqlite3.Connection, Obj, Obj], None] | None = None


_USER_KIND = _Kind[User]("user", "users", _USER_COLUMNS, _user_row, _read_user)
_TEAM_KIND = _Kind[Team]("team", "teams", _TEAM_COLUMNS, _team_row, _read_team,
                         lambda db, old, new: _set_members(db, new.name, old.members, new.members))
_KEY_KIND = _Kind[AccessKey]("access key", "access_keys", _KEY_COLUMNS, _key_row, _read_key)
_KINDS: dict[str, _Kind[Any]] = {kind.what: kind for kind in (_USER_KIND, _TEAM_KIND, _KEY_KIND)}
