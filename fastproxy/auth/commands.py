"""`fastproxy token issue|jwks|revoke`: Direct Cluster Endpoint tokens from the command line.

A refused command raises ConfigError with one line naming the bad flag or key; `fastproxy`
prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import sys
import time
from typing import Any

import orjson

from ..config import MAX_TOKEN_TTL, Config, ConfigError, load_config

_JTI = re.compile(r"[A-Za-z0-9._:-]{1,256}\Z")


def add_token_commands(subparsers: Any) -> None:
    """Add the `token` command group to a parser's subparsers."""
    group = subparsers.add_parser("token", help="issue and revoke Direct Cluster Endpoint tokens")
    commands = group.add_subparsers(dest="token_command", required=True, metavar="COMMAND",
                                    parser_class=type(group))

    issue = commands.add_parser("issue", help="print a token for one user on one cluster")
    issue.add_argument("--config", required=True, metavar="FILE", help="a configuration with [tokens] signing_keys_dir")
    issue.add_argument("--user", required=True, metavar="NAME", help="a user of the state file or [[access_keys]]")
    issue.add_argument("--cluster", required=True, metavar="NAME", help="the only cluster the token is valid on")
    issue.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default: 3600)")
    issue.add_argument("--scope", metavar="FILE", help="an AccessKeyScope as JSON, narrowing the token")
    issue.set_defaults(handler=token_issue)

    jwks = commands.add_parser("jwks", help="print the public keys that edge gateways verify tokens with")
    jwks.add_argument("--config", required=True, metavar="FILE", help="a configuration with [tokens] signing_keys_dir")
    jwks.set_defaults(handler=token_jwks)

    revoke = commands.add_parser("revoke", help="revoke a token by its id (the jti claim)")
    revoke.add_argument("jti", metavar="JTI")
    revoke.add_argument("--config", required=True, metavar="FILE",
                        help="a configuration with a [state] path or [tokens] revocation_file")
    revoke.set_defaults(handler=token_revoke)


def _signing_config(path: str) -> Config:
    config = load_config(path)
    if config.tokens is None or config.tokens.signing_keys_dir is None:
        raise ConfigError(f"--config: {path} has no [tokens] signing_keys_dir; this gateway does not sign tokens")
    return config


def token_issue(args: argparse.Namespace) -> int:
    from .credentials import load_key_set
    from .scopes import ScopeError, parse_scope
    from .tokens import issue_token

    config = _signing_config(args.config)
    if args.cluster not in {cluster.name for cluster in config.clusters}:
        raise ConfigError(f"--cluster: no cluster named {args.cluster!r} in {args.config}")
    scope = None
    if args.scope is not None:
        try:
            with open(args.scope, "rb") as file:
                scope = parse_scope(file.read())
        except OSError as error:
            raise ConfigError(f"--scope: {args.scope}: {error.strerror}") from None
        except ScopeError as error:
            raise ConfigError(f"--scope: {args.scope}: {error}") from None
    subject, groups = _user_identity(config, args.user)
    keyset = load_key_set(config)
    if not 0 < args.ttl <= keyset.max_token_lifetime:
        raise ConfigError(f"--ttl: must be between 1 and {keyset.max_token_lifetime} seconds, not {args.ttl}")
    now = time.time()
    try:
        token = issue_token(keyset, issuer=config.tokens.issuer, subject=subject, audience=args.cluster,
                            groups=groups, scope=scope, ttl=args.ttl, now=now)
    except ValueError as error:  # a user or group name that cannot travel in a header
        raise ConfigError(f"--user: {error}") from None
    print(token)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now) + args.ttl))
    print(f"jti: {_claims(token)['jti']}, expires {expires}", file=sys.stderr)
    return 0


def _user_identity(config: Config, name: str) -> tuple[str, list[str]]:
    """(subject, groups) of a user, as an access key of theirs resolves: from the state file if
    there is one, else from the first [[access_keys]] entry for that user."""
    from ..store.base import user_groups
    from .credentials import open_state_admin

    if config.state is not None:
        store = open_state_admin(config)
        try:
            users = {user.name: user for user in store.list_users()}
            teams = store.list_teams()
        finally:
            store.close()
        user = users.get(name)
        if user is None:
            raise ConfigError(f"--user: no user {name!r} in the state file {config.state.path}")
        if user.disabled:
            raise ConfigError(f"--user: user {name!r} is disabled")
        return user.subject or user.name, user_groups(user, [team for team in teams if name in team.members])
    for key in config.access_keys:
        if key.user == name:
            return key.user, list(key.groups)
    raise ConfigError(f"--user: no [[access_keys]] entry for user {name!r} in {config.path}")


def _claims(token: str) -> dict[str, Any]:
    import jwt
    return jwt.decode(token, options={"verify_signature": False})


def token_jwks(args: argparse.Namespace) -> int:
    from .credentials import load_key_set

    print(orjson.dumps(load_key_set(_signing_config(args.config)).jwks(), option=orjson.OPT_INDENT_2).decode())
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    """Record the id in every place gateways read revocations from: the state file (this
    gateway's workers) and the revocation file (gateways that verify without a state file)."""
    from ..store import StoreError
    from .credentials import open_state_admin

    jti = args.jti
    if not _JTI.match(jti):
        raise ConfigError(f"JTI: {jti!r} is not a token id (letters, digits, '.', '_', ':' and '-')")
    config = load_config(args.config)
    revocation_file = config.tokens.revocation_file if config.tokens is not None else None
    if config.state is None and revocation_file is None:
        raise ConfigError(f"--config: {args.config} has neither a [state] path nor a [tokens] revocation_file")
    if config.state is not None:
        store = open_state_admin(config)
        try:
            # Kept until any token with this id has expired: none lives longer than the maximum.
            store.revoke_token(jti, time.time() + (config.tokens.max_ttl if config.tokens is not None else MAX_TOKEN_TTL))
        except StoreError as error:
            raise ConfigError(f"state.path: {error}") from None
        finally:
            store.close()
        print(f"token {jti} revoked in {config.state.path}")
    if revocation_file is not None:
        _add_to_revocation_file(revocation_file, jti)
        print(f"token {jti} revoked in {revocation_file}")
    return 0


def _add_to_revocation_file(path: str, jti: str) -> None:
    """Add a line, or an element when the file holds a JSON list; gateways re-read it on change."""
    try:
        with open(path, "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # two revocations at once must not lose one
            file.seek(0)
            text = file.read()
            if text.lstrip().startswith("["):
                ids = orjson.loads(text)
                if jti not in ids:
                    file.seek(0)
                    file.truncate()
                    file.write(orjson.dumps([*ids, jti]).decode() + "\n")
            elif jti not in (line.strip() for line in text.splitlines()):
                file.write(("" if not text or text.endswith("\n") else "\n") + jti + "\n")
            file.flush()
            os.fsync(file.fileno())
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokens.revocation_file: {path}: {error}") from None
