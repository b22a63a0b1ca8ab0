"""Signing in to the status page: the session cookie, the sign-in form's body, the CSRF check.

The cookie seals the access key itself (AES-GCM under a secret held in memory), with its expiry.
Why not a random id in a server-side table: with `workers = N` each request may reach another
worker process, and a table would have to live in the state store. Why the key rather than the
user it stood for: every request of the page authenticates the key afresh, so a key disabled,
expired or deleted, or a user no longer an administrator, ends the session at its next poll.
A key the page made itself (a password sign-in's Login key) is marked so in the cookie: signing out
revokes that key, never one the administrator pasted in.
The secret is made when this module is imported, in the supervisor before it forks its workers,
so every worker opens the others' cookies; a restart of the service ends every session.
"""
from __future__ import annotations

import base64
import binascii
import os
import struct
import time
from typing import NamedTuple
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COOKIE = "fastproxy_ui"
COOKIE_PATH = "/ui/"
_AAD = b"fastproxy status page session"
_SECRET = AESGCM(AESGCM.generate_key(bit_length=256))
_NONCE = 12
_PREFIX = struct.Struct(">d?")  # expiry (unix time), made here
MAX_FORM = 4096  # bytes of sign-in form body: a key or a password is far shorter


class Session(NamedTuple):
    key: bytes
    made_here: bool  # a Login key the sign-in created, which signing out revokes


def seal(key: bytes, expires: float, made_here: bool = False, aead: AESGCM = _SECRET) -> str:
    """The cookie value for a signed-in key, valid until `expires` (unix time)."""
    nonce = os.urandom(_NONCE)
    sealed = aead.encrypt(nonce, struct.pack(">d?", expires, made_here) + key, _AAD)
    return base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")


def unseal(value: str, now: float | None = None, aead: AESGCM = _SECRET) -> Session | None:
    """The session a cookie value holds, or None: forged, damaged, from before a restart, or expired."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        plain = aead.decrypt(raw[:_NONCE], raw[_NONCE:], _AAD)
    except (binascii.Error, ValueError, InvalidTag):
        return None
    if len(plain) <= _PREFIX.size:
        return None
    expires, made_here = _PREFIX.unpack_from(plain)
    if expires <= (time.time() if now is None else now):
        return None
    return Session(plain[_PREFIX.size:], made_here)


def set_cookie(value: str, max_age: int, secure: bool) -> bytes:
    """The Set-Cookie value: script cannot read it, and no other site's page can make the browser send it."""
    attributes = f"{COOKIE}={value}; Path={COOKIE_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    return (attributes + ("; Secure" if secure else "")).encode("ascii")


def cookie_value(header_values: list[bytes]) -> str | None:
    """The session cookie among the Cookie header values, or None."""
    for header in header_values:
        for pair in header.decode("latin-1").split(";"):
            name, eq, value = pair.strip().partition("=")
            if eq and name == COOKIE:
                return value
    return None


class SignIn(NamedTuple):
    """What a sign-in form asks for: an access key, or a user name and a password."""
    key: bytes | None = None
    username: str | None = None
    password: str | None = None


def form_fields(body: bytes) -> SignIn:
    """The fields of an application/x-www-form-urlencoded sign-in body; a field given twice, or
    empty, counts as absent. The key is trimmed (pasted with spaces); a password is taken as typed."""
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=4, strict_parsing=False, keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return SignIn()

    def one(name: str) -> str | None:
        values = fields.get(name, [])
        return values[0] if len(values) == 1 and values[0] else None

    key, username = (one("key") or "").strip(), (one("username") or "").strip()
    return SignIn(key.encode("utf-8") if key else None, username or None, one("password"))


def same_origin(origin: bytes | None, host: bytes | None, tls: bool) -> bool:
    """Whether a form POST comes from a page of this gateway (the CSRF check): browsers send the
    Origin of the page that posts, which another site cannot set to ours. No Origin: refused."""
    if not origin or not host:
        return False
    return origin == (b"https://" if tls else b"http://") + host
