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
from concurrent.futures import ThreadPoolExecutor

import orjson

from ..config import Config, ConfigError
from ..headers import impersonation_headers
from ..status import StatusError
from ..store import Snapshot, SqliteStore, StoreError
from .identity import Identity
from .tokens import KeySet, RevocationList, TokenError, TokenVerifier

log = logging.getLogger("fastproxy.auth")

POLL_INTERVAL = 0.25           # how often a worker asks the store whether anything changed
ACTIVITY_FLUSH_INTERVAL = 5.0  # how often last-activity times are written, in one transaction


class StaticKeys:
    """Access keys from the configuration, looked up by the SHA-256 of the presented key."""

    def __init__(self, config: Config):
        self.by_digest: dict[bytes, tuple[bytes, Identity]] = {
            key.key_sha256: (key.key_sha256, Identity(
                user=key.user, groups=key.groups, source=key.name,
                impersonation=impersonation_headers(key.user, key.groups)))
            for key in config.access_keys
        }

    def resolve(self, token: bytes) -> Identity | None:
        # Keys are found by their digest, so lookup timing says nothing about a stored key;
        # the final comparison is constant-time all the same.
        digest = hashlib.sha256(token).digest()
        found = self.by_digest.get(digest)
        if found is not None and hmac.compare_digest(found[0], digest):
            return found[1]
        return None


class RevokedTokens:
    """Token ids revoked in the state store or listed in the revocation file."""

    __slots__ = ("stored", "listed")

    def __init__(self, listed: RevocationList | None):
        self.stored: frozenset[str] = frozenset()
        self.listed = listed

    def __contains__(self, jti: object) -> bool:
        return jti in self.stored or (self.listed is not None and jti in self.listed)


class StoreKeys:
    """The state store's access keys as one worker sees them: a snapshot, kept fresh.

    The event loop never touches the database: polls, reloads and activity writes run on one
    thread of their own, so they also never overlap each other.
    """

    def __init__(self, store: SqliteStore, revoked: RevokedTokens):
        self.store = store
        self.revoked = revoked
        self.snapshot: Snapshot = store.load_snapshot()
        revoked.stored = self.snapshot.revoked_tokens
        self.activity: dict[str, float] = {}  # key name -> last use, not written yet
        self.activity_flushed = time.monotonic()
        self.executor: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.polling = False
        self.failing = False

    def resolve(self, token: bytes, now: float) -> Identity | None:
        entry = self.snapshot.resolve(token, now)
        if entry is None:
            return None
        self.activity[entry.access_key.name] = now
        return entry.identity

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
            self.snapshot = snapshot
            self.revoked.stored = snapshot.revoked_tokens

    def tick(self) -> None:
        if self.activity and time.monotonic() - self.activity_flushed >= ACTIVITY_FLUSH_INTERVAL:
            batch, self.activity = self.activity, {}
            self.activity_flushed = time.monotonic()
            self.loop.run_in_executor(self.executor, self.store.record_activity, batch).add_done_callback(
                self._activity_written)

    @staticmethod
    def _activity_written(done: asyncio.Future) -> None:
        if done.exception() is not None:
            log.warning("access key activity not recorded: %s", done.exception())

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        try:
            if self.activity:
                self.store.record_activity(self.activity)
        except Exception as error:
            log.warning("access key activity not recorded: %s", error)
        self.store.close()


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
        return KeySet(tokens.signing_keys_dir, algorithm=tokens.algorithms[0])
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokens.signing_keys_dir: {error}") from None


def open_store(config: Config) -> SqliteStore:
    try:
        return SqliteStore(config.state.path)
    except StoreError as error:
        raise ConfigError(f"state.path: {error}") from None


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
        self.store = StoreKeys(open_store(config), revoked) if config.state is not None else None
        self.tokens = TokenKeys(config, revoked) if tokens is not None else None

    def authenticate(self, credential: bytes, cluster: str) -> Identity:
        """The identity `credential` (a key or token) stands for on `cluster`; StatusError 401 if none."""
        identity = self.static.resolve(credential)
        if identity is not None:
            return identity
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
