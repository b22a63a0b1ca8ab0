"""Who is calling: a bearer credential resolved to an Identity, with no I/O on the request path.

Three sources, in order: the static `[[access_keys]]` of the configuration, the state store's
access keys (a snapshot in memory, refreshed off the event loop), and Direct Cluster Endpoint
tokens (signature checked once per token, then cached). Refusals say why in terms safe to show
the caller; nothing here logs a key or a token.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import orjson

from ..config import Config, ConfigError, StateConfig
from ..status import StatusError
from ..store import Snapshot, StateAdmin, StateReader, StoreError, open_admin, open_reader
from .identity import HeaderValueError, Identity, identity_header_lines
from .tokens import KeySet, RevocationList, TokenError, TokenVerifier

T = TypeVar("T")

log = logging.getLogger("fastproxy.auth")

ACTIVITY_FLUSH_INTERVAL = 5.0  # how often last-activity times are written, in one transaction


class StaticKeys:
    """Access keys from the configuration, looked up by the SHA-256 of the presented key."""

    def __init__(self, config: Config):
        self.by_digest: dict[bytes, tuple[bytes, Identity]] = {}
        # Keys that verified, by Python's own (randomly keyed) hash of the key: at most one entry a
        # key, gone with this object when a reload replaces the keys.
        self.verified: dict[int, tuple[bytes, Identity]] = {}
        for i, key in enumerate(config.access_keys):
            try:
                lines = identity_header_lines(key.user, key.groups)
            except HeaderValueError as error:  # config.py refuses these already
                raise ConfigError(f"access_keys[{i}]: {error}") from None
            self.by_digest[key.key_sha256] = (key.key_sha256, Identity(
                user=key.user, groups=key.groups, source=key.name, impersonation=lines))


class RevokedTokens:
    """Token ids revoked in the state store or listed in the revocation file."""

    __slots__ = ("stored", "listed")

    def __init__(self, listed: RevocationList | None):
        self.stored: frozenset[str] = frozenset()
        self.listed = listed

    def __contains__(self, jti: object) -> bool:
        return jti in self.stored or (self.listed is not None and jti in self.listed)


class StoreKeys:
    """The state store's access keys as one worker sees them: the reader's snapshot, and the
    activity of the keys used, written in batches through the reader (never on the loop)."""

    def __init__(self, reader: StateReader, revoked: RevokedTokens):
        self.reader = reader
        self.revoked = revoked
        self.snapshot: Snapshot = reader.snapshot
        revoked.stored = self.snapshot.revoked_tokens
        reader.subscribe(self._changed)
        self.activity: dict[str, float] = {}  # key name -> last use, not written yet
        self.activity_flushed = time.monotonic()

    def _changed(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.revoked.stored = snapshot.revoked_tokens

    def resolve(self, token: bytes, now: float) -> Identity | None:
        entry = self.snapshot.resolve(token, now)
        if entry is None:
            return None
        self.activity[entry.access_key.name] = now
        return entry.identity

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reader.start(loop)

    def tick(self) -> None:
        if self.activity and time.monotonic() - self.activity_flushed >= ACTIVITY_FLUSH_INTERVAL:
            batch, self.activity = self.activity, {}
            self.activity_flushed = time.monotonic()
            self.reader.record_activity(batch)

    def close(self) -> None:
        batch, self.activity = self.activity, {}
        self.reader.record_activity(batch)  # written before close returns
        self.reader.close()


class TokenKeys:
    """The keys that verify tokens: this gateway's own key set, or a JWKS file re-read on change."""

    def __init__(self, config: Config, revoked: RevokedTokens):
        tokens = config.tokens
        self.jwks_file = tokens.jwks_file
        self.jwks_stamp: tuple[int, int, int] | None = None
        self.revocations = revoked.listed
        if tokens.signing_keys_dir is not None:
            jwks = load_key_set(config).jwks()
        else:
            try:
                jwks, self.jwks_stamp = _read_jwks(self.jwks_file)
            except (OSError, ValueError) as error:
                raise ConfigError(f"tokens.jwks_file: {error}") from None
        self.verifier = TokenVerifier(jwks, tokens.issuer, tokens.algorithms, revoked)

    def tick(self) -> None:
        if self.revocations is not None:
            try:
                self.revocations.reload_if_changed()
            except (OSError, ValueError) as error:
                log.error("tokens.revocation_file: %s; the previous list stays in force", error)
        if self.jwks_file is not None:
            try:
                if _stamp(self.jwks_file) != self.jwks_stamp:
                    jwks, self.jwks_stamp = _read_jwks(self.jwks_file)
                    self.verifier.set_jwks(jwks)
                    log.info("tokens.jwks_file: reloaded %s", self.jwks_file)
            except (OSError, ValueError) as error:
                log.error("tokens.jwks_file: %s; the previous keys stay in force", error)


def load_key_set(config: Config) -> KeySet:
    """The signing key set of `[tokens] signing_keys_dir`, generated on first use."""
    tokens = config.tokens
    try:
        return KeySet(tokens.signing_keys_dir, algorithm=tokens.algorithms[0], max_token_lifetime=tokens.max_ttl)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokens.signing_keys_dir: {error}") from None


def _open_state(config: Config, opener: Callable[[StateConfig], T]) -> T:
    assert config.state is not None
    try:
        return opener(config.state)
    except StoreError as error:
        raise ConfigError(f"state.path: {error}") from None


def open_state_admin(config: Config) -> StateAdmin:
    """The admin side of the `[state]` store; ConfigError naming the key if it cannot be opened."""
    return _open_state(config, open_admin)


def open_state_reader(config: Config) -> StateReader:
    """The data path's side of the `[state]` store; ConfigError naming the key if it cannot be read."""
    return _open_state(config, open_reader)


def _stamp(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read_jwks(path: str) -> tuple[dict, tuple[int, int, int]]:
    stamp = _stamp(path)
    with open(path, "rb") as f:
        jwks = orjson.loads(f.read())
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError(f"{path} is not a JWKS (an object with a 'keys' list)")
    return jwks, stamp


class Authenticator:
    """Bearer credential -> Identity for one worker; see the module docstring for the order."""

    def __init__(self, config: Config):
        """Load every source now; a source that cannot be used raises ConfigError naming its key."""
        self.static = StaticKeys(config)
        tokens = config.tokens
        revoked = RevokedTokens(None)
        if tokens is not None and tokens.revocation_file is not None:
            try:
                revoked.listed = RevocationList(tokens.revocation_file)
            except (OSError, ValueError) as error:
                raise ConfigError(f"tokens.revocation_file: {error}") from None
        self.store = StoreKeys(open_state_reader(config), revoked) if config.state is not None else None
        self.tokens = TokenKeys(config, revoked) if tokens is not None else None

    def authenticate(self, credential: bytes, cluster: str | None) -> Identity:
        """The identity `credential` (a key or token) stands for on `cluster` (None: the gateway's
        own API, where a token for any of the clusters is accepted); StatusError 401 if none."""
        # The static keys. Keys are found by their digest, or once verified by their hash (keyed
        # at random when Python starts), so lookup timing says nothing about a stored key; the final
        # comparison is constant-time all the same. A verified key skips the SHA-256.
        static = self.static
        found = static.verified.get(hash(credential))
        if found is not None and hmac.compare_digest(found[0], credential):
            return found[1]
        digest = hashlib.sha256(credential).digest()
        found = static.by_digest.get(digest)
        if found is not None and hmac.compare_digest(found[0], digest):
            static.verified[hash(credential)] = (credential, found[1])
            return found[1]
        if self.store is not None:
            identity = self.store.resolve(credential, time.time())
            if identity is not None:
                return identity
        if self.tokens is not None and credential.count(b".") == 2:
            try:
                return self.tokens.verifier.verify(credential.decode("ascii"), cluster).identity
            except UnicodeDecodeError:
                pass
            except TokenError as error:
                raise StatusError(401, f"Unauthorized: {error}") from None
        raise StatusError(401, "Unauthorized: invalid access key")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.store is not None:
            self.store.start(loop)

    def tick(self) -> None:
        """Once a second: write batched activity, re-read changed revocation and JWKS files."""
        if self.store is not None:
            self.store.tick()
        if self.tokens is not None:
            self.tokens.tick()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
