"""`fastproxy user|team|accesskey ...`: manage identities in the state file.

Every handler takes the parsed arguments and returns the exit status; a refused command prints
one line naming the bad flag or value and exits with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import getpass
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..auth.passwords import PasswordError, hash_password
from ..auth.scopes import ScopeError
from ..config import ConfigError, StateConfig, load_config
from . import open_admin
from .base import ACCESS_KEY_TYPES, StateAdmin, StoreError

USAGE_ERROR = 2


class CommandParser(argparse.ArgumentParser):
    """Reports a usage error as one line (no usage block) with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def add_commands(subparsers: Any) -> None:
    """Add the `user`, `team` and `accesskey` command groups to a parser's subparsers."""
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state", metavar="PATH", help="the SQLite state file (default: --config's [state] path)")
    state.add_argument("--config", metavar="FILE", help="a gateway configuration with a [state] path")

    def group(name: str, help_text: str) -> Any:
        parser = subparsers.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND",
                                     parser_class=CommandParser)

    def command(commands: Any, name: str, handler: Callable[[argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, parents=[state], help=help_text)
        parser.set_defaults(handler=handler)
        return parser

    users = group("user", "manage users")
    create = command(users, "create", user_create, "create a user")
    create.add_argument("name")
    create.add_argument("--username", default="")
    create.add_argument("--display-name", default="")
    create.add_argument("--email", default="")
    create.add_argument("--subject", default="", help="the name clusters see (default: NAME)")
    create.add_argument("--group", action="append", default=[], metavar="GROUP", help="repeatable")
    command(users, "list", user_list, "list users")
    command(users, "disable", user_disable, "disable a user: none of their keys resolve").add_argument("name")
    command(users, "set-password", user_set_password,
            "set a user's password for /auth/password/login, read from the terminal or standard input"
            ).add_argument("name")

    teams = group("team", "manage teams")
    create = command(teams, "create", team_create, "create a team")
    create.add_argument("name")
    create.add_argument("--member", action="append", default=[], metavar="USER", help="repeatable")
    create.add_argument("--group", action="append", default=[], metavar="GROUP", help="repeatable")
    command(teams, "list", team_list, "list teams")

    keys = group("accesskey", "manage access keys")
    create = command(keys, "create", accesskey_create, "create an access key and print it once")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--user", metavar="NAME")
    owner.add_argument("--team", metavar="NAME")
    create.add_argument("--name", help="the key's name (default: OWNER-<random>)")
    lifetime = create.add_mutually_exclusive_group()
    lifetime.add_argument("--ttl", type=_seconds, default=0, metavar="SECONDS", help="0: never expires")
    lifetime.add_argument("--ttl-after-last-activity", type=_seconds, metavar="SECONDS",
                          help="expire after this long without use")
    create.add_argument("--scope", metavar="FILE", help="an AccessKeyScope as JSON")
    create.add_argument("--type", choices=ACCESS_KEY_TYPES, default="User")
    create.add_argument("--display-name", default="")
    command(keys, "list", accesskey_list, "list access keys")
    command(keys, "disable", accesskey_disable, "disable an access key: it stops resolving").add_argument("name")
    command(keys, "revoke", accesskey_revoke, "delete an access key").add_argument("name")

    activity = group("activity", "sleep-mode activity of namespaces")
    command(activity, "list", activity_list, "list the namespaces requests reached, the latest first")


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds")
    return int(text)


def _refusing(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (StoreError, ScopeError) as error:
            message = str(error)
        except sqlite3.Error as error:
            message = f"--state {args.state}: {error}"
        print(f"fastproxy: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    return run


def state_config(args: argparse.Namespace) -> StateConfig:
    """--state (a SQLite file), else the [state] of --config; raises StoreError naming the flag."""
    if args.state is not None:
        return StateConfig(path=args.state)
    if args.config is None:
        raise StoreError("--state: required (or --config FILE with a [state] path)")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise StoreError(f"--config: {error}") from None
    if config.state is None:
        raise StoreError(f"--config: {args.config} has no [state] path; give --state")
    return config.state


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[StateAdmin]:
    state = state_config(args)
    args.state = state.path
    store = open_admin(state)
    try:
        yield store
    finally:
        store.close()


@_refusing
def user_create(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.create_user(args.name, username=args.username, display_name=args.display_name,
                          email=args.email, subject=args.subject, groups=args.group)
    print(f"user {args.name} created")
    return 0


@_refusing
def user_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        users = store.list_users()
    _print_table(("NAME", "USERNAME", "SUBJECT", "EMAIL", "GROUPS", "DISABLED", "PASSWORD"),
                 [(user.name, user.username, user.subject, user.email, ",".join(user.groups),
                   "yes" if user.disabled else "no", "yes" if user.password_hash else "no") for user in users])
    return 0


@_refusing
def user_disable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.disable_user(args.name)
    print(f"user {args.name} disabled")
    return 0


@_refusing
def user_set_password(args: argparse.Namespace) -> int:
    password = _read_password()
    try:
        hashed = hash_password(password)
    except PasswordError as error:
        raise StoreError(f"password: {error}") from None
    with _store(args) as store:
        store.update_user(args.name, password_hash=hashed)
    print(f"user {args.name}: password set")
    return 0


def _read_password() -> str:
    """The new password: asked twice on a terminal, else the first line of standard input (never argv,
    which other users of the host can read)."""
    if sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise StoreError("password: the two entries differ")
        return password
    return sys.stdin.readline().rstrip("\r\n")


@_refusing
def team_create(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.create_team(args.name, members=args.member, groups=args.group)
    print(f"team {args.name} created")
    return 0


@_refusing
def team_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        teams = store.list_teams()
    _print_table(("NAME", "MEMBERS", "GROUPS"),
                 [(team.name, ",".join(team.members), ",".join(team.groups)) for team in teams])
    return 0


@_refusing
def accesskey_create(args: argparse.Namespace) -> int:
    scope = None
    if args.scope is not None:
        try:
            with open(args.scope, "rb") as file:
                scope = file.read()
        except OSError as error:
            raise StoreError(f"--scope {args.scope}: {error.strerror}") from None
    try:
        with _store(args) as store:
            key, secret = store.create_access_key(
                user=args.user, team=args.team, name=args.name, type=args.type, display_name=args.display_name,
                ttl=args.ttl or args.ttl_after_last_activity or 0,
                ttl_after_last_activity=args.ttl_after_last_activity is not None, scope=scope)
    except ScopeError as error:
        raise StoreError(f"--scope {args.scope}: {error}") from None
    print(f"name: {key.name}")
    print(f"key: {secret}")
    print("the key is shown only this once", file=sys.stderr)
    return 0


@_refusing
def accesskey_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        keys = store.list_access_keys()
    _print_table(("NAME", "TYPE", "OWNER", "EXPIRES", "LAST-ACTIVITY", "DISABLED", "SCOPED"),
                 [(key.name, key.type, f"user/{key.user}" if key.user else f"team/{key.team}",
                   _time(key.expires_at()), _time(key.last_activity), "yes" if key.disabled else "no",
                   "yes" if key.scope is not None else "no") for key in keys])
    return 0


@_refusing
def accesskey_disable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.disable_access_key(args.name)
    print(f"access key {args.name} disabled")
    return 0


@_refusing
def accesskey_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.revoke_access_key(args.name)
    print(f"access key {args.name} revoked")
    return 0


@_refusing
def activity_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        activities = sorted(store.list_namespace_activity(), key=lambda activity: -activity.last_activity)
    _print_table(("CLUSTER", "NAMESPACE", "LAST-ACTIVITY", "SUBJECT", "VERB", "RESOURCE"),
                 [(a.cluster, a.namespace, _time(a.last_activity), a.subject or "-", a.verb or "-",
                   "/".join(filter(None, (a.resource, a.subresource))) or "-") for a in activities])
    return 0


def _time(moment: float | None) -> str:
    if moment is None:
        return "-"
    if moment == float("inf"):
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[column])) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command, as `fastproxy` will once these commands are wired into it."""
    parser = CommandParser(prog="fastproxy")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=CommandParser))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(run())
