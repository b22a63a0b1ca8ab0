"""Who a request runs as, once its credential is resolved, and the header lines that say so upstream.

`identity_header_lines` is the one builder of `Impersonate-*` lines and `check_header_value` the
one check of what goes into them: static keys, the state store, tokens and nested impersonation
all use them. This module imports nothing of fastproxy, so configuration and store code can too.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Bytes an HTTP header name may hold as they are (RFC 9110 tchar), '%' aside: it starts an escape.
_NAME_SAFE = frozenset(b"!#$&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Identity:
    """The subject a credential resolves to.

    `impersonation` is the precomputed block of `Impersonate-User` / `Impersonate-Group` header
    lines sent upstream, built once when the identity is loaded so the hot path only joins bytes.
    `scope` is the access key scope (None: unrestricted); `source` names the credential for logs
    and audit (an access key's name, never the key itself).
    """

    user: str
    groups: tuple[str, ...]
    source: str
    impersonation: bytes = field(repr=False)
    scope: Any = None


class HeaderValueError(ValueError):
    """A value that cannot travel as one header value; the message is one line naming it."""


def key_digest(key: str | bytes) -> bytes:
    """The SHA-256 by which access keys are stored and looked up."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def check_header_value(value: str, what: str) -> str:
    """`value`, or HeaderValueError if it could not travel as one impersonation header value.

    Leading or trailing spaces are refused too: HTTP parsers strip them, so " system:masters"
    would arrive upstream as "system:masters".
    """
    if not isinstance(value, str) or not value or _CONTROL.search(value) or value != value.strip():
        raise HeaderValueError(f"{what} {value!r} must be non-empty, without CR, LF, NUL or other control "
                               "characters and without leading or trailing spaces")
    return value


def escape_extra_key(key: str) -> bytes:
    """An Impersonate-Extra-* key as a header name suffix, percent-escaped as client-go escapes it."""
    return b"".join(bytes((byte,)) if byte in _NAME_SAFE else b"%%%02X" % byte for byte in key.encode())


def identity_header_lines(user: str, groups: Iterable[str] = (), uid: str | None = None,
                          extras: Iterable[tuple[str, Iterable[str]]] | None = None) -> bytes:
    """The Impersonate-User, -Group, -Uid and -Extra-* header lines (each ending CRLF) for the
    upstream request; raises HeaderValueError for a value that could not be sent as one.
    `extras` is (key, values) pairs, e.g. a dict's items()."""
    lines = [b"Impersonate-User: " + check_header_value(user, "user").encode() + b"\r\n"]
    lines += [b"Impersonate-Group: " + check_header_value(group, "group").encode() + b"\r\n" for group in groups]
    if uid:
        lines.append(b"Impersonate-Uid: " + check_header_value(uid, "uid").encode() + b"\r\n")
    for key, values in extras or ():
        name = b"Impersonate-Extra-" + escape_extra_key(key)  # escaped: any key is a safe header name
        lines += [name + b": " + check_header_value(value, f"extra {key!r}").encode() + b"\r\n" for value in values]
    return b"".join(lines)
