"""`fastproxy state migrate --from sqlite:PATH --to etcd --config FILE`: copy a SQLite state file into
the etcd of FILE's `[state]`, keeping every object's uid, creation time and key digest.

Idempotent: an object already in etcd with the same uid is left as it is there (it may have changed
since); one with the same name and another uid is a different object, and the migration stops
naming it rather than overwrite it. Activity keeps the newer of both. At the end every name of the
file must be in etcd, else the command fails with the counts that differ.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import ConfigError, load_config
from .base import StoreError
from .etcd import ACCESS_KEYS, TEAMS, USERS, EtcdStore, Kind
from .sqlite import SqliteStore


def add_migrate_command(subparsers: Any) -> None:
    state = subparsers.add_parser("state", help="the state store as a whole")
    commands = state.add_subparsers(dest="state_command", required=True, metavar="COMMAND")
    migrate = commands.add_parser("migrate", help="copy a SQLite state file into etcd (idempotent)")
    migrate.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH")
    migrate.add_argument("--to", dest="target", required=True, choices=["etcd"])
    migrate.add_argument("--config", required=True, metavar="FILE", help="a gateway configuration with [state] backend = \"etcd\"")
    migrate.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    kind, _, path = args.source.partition(":")
    if kind != "sqlite" or not path:
        return _refuse(f"--from: {args.source!r} is not sqlite:PATH")
    config = load_config(args.config)
    if config.state is None or config.state.etcd is None:
        raise ConfigError(f"--config: {args.config} has no [state] with backend = \"etcd\"")
    try:
        source = SqliteStore(path)
    except StoreError as error:
        return _refuse(f"--from: {error}")
    target = EtcdStore(config.state.etcd)
    try:
        counts = migrate(source, target)
    except StoreError as error:
        return _refuse(str(error))
    finally:
        source.close()
        target.close()
    print("in etcd: " + ", ".join(f"{count} {what}" for what, count in counts.items()))
    return 0


def _refuse(message: str) -> int:
    print(f"fastproxy: error: {message}", file=sys.stderr)
    return 2


def migrate(source: SqliteStore, target: EtcdStore) -> dict[str, int]:
    """Copy everything; the number of each kind now in etcd. StoreError for a name clash or a count that differs."""
    users, teams, keys = source.list_users(), source.list_teams(), source.list_access_keys()
    for user in users:
        target.import_object(USERS, user)
    for team in teams:
        target.import_object(TEAMS, team)
    for key in keys:
        target.import_object(ACCESS_KEYS, key)
    target.record_activity({key.name: key.last_activity for key in keys if key.last_activity is not None})
    target.record_namespace_activity({(a.cluster, a.namespace): a for a in source.list_namespace_activity()})
    revoked = source.list_revoked_tokens()
    for jti, expires_at in revoked.items():
        target.revoke_token(jti, expires_at)
    state = target.load_state()
    counts = {}
    kinds: tuple[tuple[Kind[Any], list[Any]], ...] = ((USERS, users), (TEAMS, teams), (ACCESS_KEYS, keys))
    for kind, objects in kinds:
        missing = {obj.name for obj in objects} - set(state.objects[kind.folder])
        if missing:
            raise StoreError(f"{len(missing)} of {len(objects)} {kind.what}s did not reach etcd, {sorted(missing)[0]!r} first")
        counts[f"{kind.what}s"] = len(state.objects[kind.folder])
    counts["revoked tokens"] = len(set(revoked) & set(state.revoked))  # expired ones have no lease left to hold
    return counts
