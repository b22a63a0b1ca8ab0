"""The SQLite state store: one file shared by every worker process, in WAL mode.

`SqliteStore` is the admin side (and the primitives the reader uses); `SqliteReader` is the
data path's side: it polls `changed_since` off the event loop every POLL_INTERVAL.

Every write except last-activity updates bumps `meta.generation` (by trigger, so no write path
can forget it); `changed_since` reads that one row. Activity is left out so that the batched
activity writes do not make every worker reload its snapshot.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import orjson

from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, AccessKeyScope, parse_scope
from .base import (
    ACCESS_KEY_TYPES,
    AccessKey,
    Snapshot,
    StateAdmin,
    StateReader,
    StoreError,
    Team,
    User,
    build_snapshot,
    check_object_name,
    header_value,
    key_digest,
)

log = logging.getLogger("fastproxy.store")

POLL_INTERVAL = 0.25  # how often a reader asks the file whether anything changed


def _bump_on_change(table: str, update_columns: str = "") -> tuple[str, ...]:
    update = f"UPDATE OF {update_columns}" if update_columns else "UPDATE"
    return tuple(f"CREATE TRIGGER {table}_{label} AFTER {event} ON {table} "
                 "BEGIN UPDATE meta SET generation = generation + 1; END"
                 for label, event in (("insert", "INSERT"), ("update", update), ("delete", "DELETE")))


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
)


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

    # ---- users and teams ----

    def create_user(self, name: str, *, username: str = "", display_name: str = "", email: str = "",
                    subject: str = "", groups: Iterable[str] = ()) -> User:
        check_object_name(name, "user")
        subject = header_value(subject or name, "subject")
        user = User(name, username or name, display_name, email, subject, _groups(groups), False, time.time())
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"user {name!r} already exists")
            db.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                       (name, user.username, display_name, email, subject, _json(user.groups), user.created))
        return user

    def list_users(self) -> list[User]:
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM users ORDER BY name").fetchall()
        return [_user(row) for row in rows]

    def disable_user(self, name: str) -> None:
        with self._transaction(write=True) as db:
            if not db.execute("UPDATE users SET disabled = 1 WHERE name = ?", (name,)).rowcount:
                raise StoreError(f"user {name!r} does not exist")

    def create_team(self, name: str, *, members: Iterable[str] = (), groups: Iterable[str] = ()) -> Team:
        check_object_name(name, "team")
        team = Team(name, tuple(sorted(set(members))), _groups(groups), time.time())
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM teams WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"team {name!r} already exists")
            for member in team.members:
                if not db.execute("SELECT 1 FROM users WHERE name = ?", (member,)).fetchone():
                    raise StoreError(f"team member {member!r} is not a user")
            db.execute("INSERT INTO teams VALUES (?, ?, ?)", (name, _json(team.groups), team.created))
            db.executemany("INSERT INTO team_members VALUES (?, ?)", [(name, member) for member in team.members])
        return team

    def list_teams(self) -> list[Team]:
        with self._transaction() as db:
            return _teams(db)

    # ---- access keys ----

    def create_access_key(self, *, user: str | None = None, team: str | None = None, name: str | None = None,
                          type: str = "User", display_name: str = "", ttl: int = 0,
                          ttl_after_last_activity: bool = False, scope: Any = None,
                          now: float | None = None) -> tuple[AccessKey, str]:
        if (user is None) == (team is None):
            raise StoreError("an access key belongs to exactly one user or one team")
        if type not in ACCESS_KEY_TYPES:
            raise StoreError(f"access key type {type!r} is not one of {', '.join(ACCESS_KEY_TYPES)}")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise StoreError(f"ttl {ttl!r} must be a whole number of seconds, 0 for no expiry")
        if ttl_after_last_activity and not ttl:
            raise StoreError("ttlAfterLastActivity needs a ttl")
        if scope is not None and not isinstance(scope, AccessKeyScope):
            scope = parse_scope(scope)
        owner = user if user is not None else team
        name = check_object_name(name or f"{owner}-{secrets.token_hex(4)}", "access key")
        secret = secrets.token_urlsafe(32)
        key = AccessKey(name, type, user, team, key_digest(secret), display_name, ttl, ttl_after_last_activity,
                        False, None if scope is None else scope.to_dict(), time.time() if now is None else now)
        with self._transaction(write=True) as db:
            table, what = ("users", "user") if user is not None else ("teams", "team")
            if not db.execute(f"SELECT 1 FROM {table} WHERE name = ?", (owner,)).fetchone():
                raise StoreError(f"{what} {owner!r} does not exist")
            if db.execute("SELECT 1 FROM access_keys WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"access key {name!r} already exists")
            db.execute("INSERT INTO access_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, NULL)",
                       (name, type, display_name, user, team, key.digest, ttl, int(ttl_after_last_activity),
                        None if key.scope is None else _json(key.scope), key.created))
        return key, secret

    def list_access_keys(self) -> list[AccessKey]:
        with self._transaction() as db:
            return _access_keys(db)

    def disable_access_key(self, name: str) -> None:
        with self._transaction(write=True) as db:
            if not db.execute("UPDATE access_keys SET disabled = 1 WHERE name = ?", (name,)).rowcount:
                raise StoreError(f"access key {name!r} does not exist")

    def revoke_access_key(self, name: str) -> None:
        with self._transaction(write=True) as db:
            if not db.execute("DELETE FROM access_keys WHERE name = ?", (name,)).rowcount:
                raise StoreError(f"access key {name!r} does not exist")

    def revoke_token(self, jti: str, expires_at: float) -> None:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO revoked_tokens VALUES (?, ?)", (jti, expires_at))

    def record_activity(self, batch: Mapping[str, float]) -> None:
        """Write last-activity times (key name -> unix time) in one transaction; blocks."""
        if not batch:
            return
        with self._transaction(write=True) as db:
            db.executemany(
                "UPDATE access_keys SET last_activity = ?1 WHERE name = ?2 "
                "AND (last_activity IS NULL OR last_activity < ?1)",
                [(when, name) for name, when in batch.items()])

    # ---- what the reader uses ----

    def load_snapshot(self, now: float | None = None) -> Snapshot:
        with self._transaction() as db:  # one read transaction: a consistent view of every table
            version = db.execute("SELECT generation FROM meta").fetchone()[0]
            users = [_user(row) for row in db.execute("SELECT * FROM users")]
            teams = _teams(db)
            keys = _access_keys(db)
            revoked = [row[0] for row in db.execute("SELECT jti FROM revoked_tokens")]
        return build_snapshot(version, users, teams, keys, revoked, time.time() if now is None else now,
                              project_namespace_prefix=self._prefix)

    def changed_since(self, version: int) -> bool:
        """Whether anything a snapshot holds changed after `version`; one row, cheap to poll."""
        with self._lock:
            return self._db().execute("SELECT generation FROM meta").fetchone()[0] != version


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

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastproxy-store")
        self.timer = loop.call_later(POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self.timer = self.loop.call_later(POLL_INTERVAL, self._poll)
        if self.polling:
            return  # the previous poll or reload is still running
        self.polling = True
        snapshot = self.snapshot
        self.loop.run_in_executor(self.executor, self._fresh_snapshot, snapshot.version,
                                  snapshot.refresh_at).add_done_callback(self._polled)

    def _fresh_snapshot(self, version: int, refresh_at: float) -> Snapshot | None:
        """On the store thread: a new snapshot if anything changed or the old one is due."""
        if self.store.changed_since(version) or time.time() >= refresh_at:
            return self.store.load_snapshot()
        return None

    def _polled(self, done: asyncio.Future) -> None:
        self.polling = False
        try:
            snapshot = done.result()
        except Exception as error:  # keep serving from the last good snapshot, and say so once
            if not self.failing:
                log.error("state store %s cannot be read: %s", self.store.path, error)
                self.failing = True
            return
        if self.failing:
            log.info("state store %s readable again", self.store.path)
            self.failing = False
        if snapshot is not None:
            self.publish(snapshot)

    def record_activity(self, batch: Mapping[str, float]) -> None:
        if not batch:
            return
        if self.executor is None:
            self._write_activity(batch)
        else:
            self.executor.submit(self._write_activity, dict(batch))

    def _write_activity(self, batch: Mapping[str, float]) -> None:
        try:
            self.store.record_activity(batch)
        except Exception as error:
            log.warning("access key activity not recorded: %s", error)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.executor is not None:
            self.executor.shutdown(wait=True)  # the activity writes already submitted run first
            self.executor = None
        self.store.close()


def _groups(groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(header_value(group, "group") for group in groups))


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _user(row: tuple) -> User:
    name, username, display_name, email, subject, groups, disabled, created = row
    return User(name, username, display_name, email, subject, tuple(orjson.loads(groups)), bool(disabled), created)


def _teams(db: sqlite3.Connection) -> list[Team]:
    members: dict[str, list[str]] = {}
    for team, user in db.execute("SELECT team, user FROM team_members ORDER BY user"):
        members.setdefault(team, []).append(user)
    return [Team(name, tuple(members.get(name, ())), tuple(orjson.loads(groups)), created)
            for name, groups, created in db.execute("SELECT name, groups, created FROM teams ORDER BY name")]


def _access_keys(db: sqlite3.Connection) -> list[AccessKey]:
    return [AccessKey(name, type_, user, team, digest, display_name, ttl, bool(after_activity), bool(disabled),
                      None if scope is None else orjson.loads(scope), created, last_activity)
            for (name, type_, display_name, user, team, digest, ttl, after_activity, disabled, scope, created,
                 last_activity) in db.execute("SELECT * FROM access_keys ORDER BY name")]
