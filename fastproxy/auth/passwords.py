"""User passwords: argon2id hashes (argon2-cffi), and checking them off the event loop.

A password is never stored, logged or kept beyond the call that hashes or checks it; the store
holds only the PHC-format hash (`$argon2id$v=19$m=...,t=...,p=...$salt$digest`). Checking one
costs tens of milliseconds and tens of MiB: `PasswordChecker` runs the checks on a few threads of
its own (argon2 releases the GIL), bounds how many may wait, and checks a login for an unknown
user against a dummy hash so that it costs what a wrong password costs.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher()  # argon2id, RFC 9106's low-memory profile (t=3, m=64 MiB, p=4)
HASH_PREFIX = "$argon2id$"
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 1024  # longer ones are refused before hashing: a login must not buy unbounded work
CHECK_NICENESS = 10        # how much lower than the worker's the checking threads' priority is


class PasswordError(ValueError):
    """A password that cannot be set; the message is one line and never contains the password."""


class CheckerBusy(Exception):
    """Too many password checks are running or waiting; the client should retry shortly."""


def check_password_text(password: object) -> str:
    """`password` if it may be set: a string of MIN_PASSWORD_CHARS characters to MAX_PASSWORD_BYTES bytes."""
    if not isinstance(password, str):
        raise PasswordError("a password must be a string")
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordError(f"a password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"a password must have at most {MAX_PASSWORD_BYTES} bytes")
    return password


def hash_password(password: str) -> str:
    """The argon2id hash of a password that check_password_text accepts (blocks for tens of ms)."""
    return HASHER.hash(check_password_text(password))


def password_matches(hashed: str, password: str) -> bool:
    """Whether `password` is the one `hashed` was made from; a malformed hash matches nothing."""
    try:
        return HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _lower_priority() -> None:
    """Make the calling thread (and the threads argon2 starts from it) yield the CPU to the event loop:
    Linux keeps a nice value per thread. Without it a flood of logins, each hash on 4 lanes, would take
    the cores proxied requests need."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + CHECK_NICENESS)
    except OSError:
        pass  # not permitted here: the checks still run off the loop, only at the loop's priority


class PasswordChecker:
    """Checks passwords on `threads` threads, with at most `max_waiting` more checks queued.

    `check` is called on the event loop; a check whose caller went away still runs to its end
    (argon2 cannot be interrupted) and still counts until then, so clients that leave cannot pile
    up work beyond the bound."""

    def __init__(self, threads: int, max_waiting: int):
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastproxy-passwords",
                                           initializer=_lower_priority)
        self.limit = threads + max_waiting
        self.in_flight = 0
        self._lock = threading.Lock()
        self._dummy = ""
        self.executor.submit(self._dummy_hash)  # made ahead, so the first unknown user costs no more

    async def check(self, hashed: str | None, password: str) -> bool:
        """Whether `password` matches `hashed`; None (no such user, or no password) checks against the
        dummy hash and is False. Raises CheckerBusy when the bound is reached."""
        with self._lock:
            if self.in_flight >= self.limit:
                raise CheckerBusy
            self.in_flight += 1
        future = self.executor.submit(self._check, hashed, password)
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, future: Future[bool]) -> None:
        with self._lock:
            self.in_flight -= 1

    def _check(self, hashed: str | None, password: str) -> bool:
        if hashed is None:
            password_matches(self._dummy_hash(), password)
            return False
        return password_matches(hashed, password)

    def _dummy_hash(self) -> str:
        with self._lock:
            dummy = self._dummy
        if not dummy:
            dummy = HASHER.hash(secrets.token_urlsafe(16))
            with self._lock:
                self._dummy = self._dummy or dummy
        return dummy

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
