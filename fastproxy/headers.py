"""Header rewriting between client and upstream: pure functions over lists of (name, value).

Order matters for safety: the client's hop-by-hop headers (and every header its Connection
header names) are removed first, and only then does the gateway add its own credential and
impersonation headers, so no client header can remove or override them.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from .status import StatusError, status_line

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop headers (RFC 9110 7.6.1 and the ones proxies have historically honoured).
# Transfer-Encoding and Content-Length are not copied either: the gateway frames bodies itself.
_HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
))
# Never forwarded from a client: replaced by the gateway's own, or (Proxy: httpoxy) meant for no one.
_GATEWAY_OWNED = frozenset((b"authorization", b"host", b"content-length", b"x-forwarded-for", b"expect",
                            b"proxy"))
# Requests that carry no body unless they say so: no Content-Length: 0 is added for them.
NO_BODY_METHODS = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS"))
_WEBSOCKET_PROTOCOL = b"sec-websocket-protocol"
# Copied, and noted for the audit log (its userAgent and sourceIPs), which then need not scan again.
_NOTED = frozenset((b"user-agent", b"x-real-ip"))
# Every header the scan acts on, so that the many it only copies cost one set lookup.
_INSPECTED = _HOP_BY_HOP | _GATEWAY_OWNED | _NOTED | {_WEBSOCKET_PROTOCOL}
UPGRADE_PROTOCOLS = frozenset((b"spdy/3.1", b"websocket"))
# How browsers, which cannot set Authorization on a WebSocket, send a bearer token instead.
BEARER_SUBPROTOCOL_PREFIX = b"base64url.bearer.authorization.k8s.io."


@dataclass(slots=True)
class ClientHeaders:
    """What one pass over the client's request headers found."""

    kept: Headers
    authorization: bytes | None = None
    bearer_subprotocol: bytes | None = None  # the base64url token from Sec-WebSocket-Protocol
    impersonation: Headers | None = None     # Impersonate-* headers, names lower-cased
    forwarded_for: bytes | None = None
    user_agent: bytes | None = None
    real_ip: bytes | None = None
    upgrade: bytes | None = None
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def scan_client_headers(headers: Headers) -> ClientHeaders:
    """Split the client's headers into what is forwarded and what the gateway acts on.

    Impersonate-* headers and a bearer token subprotocol are taken out, never kept: the gateway
    decides what, if anything, goes upstream in their place. Headers the client's Connection
    header names are hop-by-hop and dropped first, impersonation included.
    Raises StatusError for requests the gateway refuses: ambiguous framing or duplicated
    singleton headers (400), an unsupported Expect (417).
    """
    kept: Headers = []
    found = ClientHeaders(kept)
    connection_tokens: list[bytes] = []
    impersonation: Headers = []
    seen_host = False
    for name, value in headers:
        lname = name.lower()
        if lname in _INSPECTED:
            if lname == b"user-agent":  # first: nearly every request has one
                found.user_agent = value
                kept.append((name, value))
            elif lname == _WEBSOCKET_PROTOCOL:
                value = _take_bearer_subprotocol(found, value)
                if value:
                    kept.append((name, value))
            elif lname == b"connection":
                connection_tokens += _tokens(value)
            elif lname == b"authorization":
                if found.authorization is not None:
                    raise StatusError(400, "more than one Authorization header", close=True)
                found.authorization = value
            elif lname == b"host":
                if seen_host:
                    raise StatusError(400, "more than one Host header", close=True)
                seen_host = True
            elif lname == b"transfer-encoding":
                # The parser already refuses Transfer-Encoding with Content-Length; anything but a
                # single plain "chunked" would be decoded differently by different servers.
                if found.chunked or value.strip().lower() != b"chunked":
                    raise StatusError(400, "unsupported Transfer-Encoding", close=True)
                found.chunked = True
            elif lname == b"content-length":
                found.content_length = int(value)  # the parser allows digits only, once
            elif lname == b"x-forwarded-for":
                found.forwarded_for = value if found.forwarded_for is None else found.forwarded_for + b", " + value
            elif lname == b"upgrade":
                found.upgrade = value.strip()
            elif lname == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise StatusError(417, "only 'Expect: 100-continue' is supported", close=True)
                found.expect_continue = True
            elif lname == b"x-real-ip":
                found.real_ip = value
                kept.append((name, value))
            continue
        if lname.startswith(b"impersonate-"):
            impersonation.append((lname, value))
            continue
        kept.append((name, value))
    if connection_tokens:
        named = frozenset(connection_tokens)
        kept[:] = [(n, v) for n, v in kept if n.lower() not in named]
        impersonation = [(n, v) for n, v in impersonation if n not in named]
    if impersonation:
        found.impersonation = impersonation
    return found


def _take_bearer_subprotocol(found: ClientHeaders, value: bytes) -> bytes:
    """Remove a bearer token entry from a Sec-WebSocket-Protocol value; the other entries stay."""
    if BEARER_SUBPROTOCOL_PREFIX not in value.lower():  # in any case: a token is never forwarded
        return value
    others = []
    for entry in value.split(b","):
        entry = entry.strip()
        if entry[:len(BEARER_SUBPROTOCOL_PREFIX)].lower() == BEARER_SUBPROTOCOL_PREFIX:
            if found.bearer_subprotocol is not None:
                raise StatusError(400, "more than one bearer token subprotocol", close=True)
            found.bearer_subprotocol = entry[len(BEARER_SUBPROTOCOL_PREFIX):]
        elif entry:
            others.append(entry)
    return b", ".join(others)


def upstream_request_head(
    method: bytes, target: bytes, version: bytes, kept: Headers, *,
    host: bytes, credential: bytes, impersonation: bytes, forwarded_for: bytes,
    framing: bytes, upgrade: bytes | None,
) -> bytes:
    """The request head sent upstream: the client's end-to-end headers, then the gateway's own.

    `credential` and `impersonation` are prebuilt header lines; `framing` is the gateway's own
    Content-Length or Transfer-Encoding line (or empty).
    """
    parts = [method, b" ", target, b" HTTP/", version, b"\r\n", host]
    for name, value in kept:
        parts += (name, b": ", value, b"\r\n")
    parts += (credential, impersonation, b"X-Forwarded-For: ", forwarded_for, b"\r\n", framing)
    if upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# Response headers never copied to the client. Transfer-Encoding is kept: chunked bodies are
# relayed exactly as the upstream framed them.
_RESPONSE_HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"upgrade",
))
# Hop-by-hop header lines as they stand in a raw head (the parser refused obs-fold, so every
# field is one CRLF-led line), a Connection line's value captured: relaying a head is one regex
# split, not a Python call per header (bench/micro: half the time of a search, a findall and a sub).
# The lookahead on the names' first letters passes most lines over without trying each name.
_RESPONSE_HOP_BY_HOP_LINE = re.compile(
    b"\r\n(?=[" + b"".join(sorted({name[:1] for name in _RESPONSE_HOP_BY_HOP})) + b"])(?:(connection)|"
    + b"|".join(re.escape(name) for name in _RESPONSE_HOP_BY_HOP - {b"connection"}) + b"):([^\r\n]*)",
    re.IGNORECASE)
_FRAMING_LINE = re.compile(b"\r\n(?:content-length|transfer-encoding):", re.IGNORECASE)
_CONNECTION_OPTIONS = frozenset((b"keep-alive", b"close"))
# Connection values as nearly every server writes them after the colon: known to name no header.
_PLAIN_CONNECTION_VALUES = frozenset((b" keep-alive", b" close", b"keep-alive", b"close"))


def response_headers(raw: bytes) -> Headers:
    """The header fields of a response head the parser already accepted."""
    lines = raw.split(b"\r\n")[1:]
    return [(name, value.strip()) for name, _, value in (line.partition(b":") for line in lines if line)]


def has_framing(raw: bytes) -> bool:
    """Whether a response head says where its body ends (else it ends when the connection does)."""
    return _FRAMING_LINE.search(raw) is not None


def relay_response_head(raw: bytes, *, keep_alive: bool) -> bytes:
    """The upstream's response head as the client gets it: usually the same bytes, or the same
    bytes less their hop-by-hop lines; rebuilt only when Connection names other headers."""
    if raw.startswith(b"HTTP/1.1 "):
        # [kept text, "connection" or None, value, kept text, ...]
        pieces = _RESPONSE_HOP_BY_HOP_LINE.split(raw)
        relayed: bytes | None = raw
        if len(pieces) > 1:
            relayed = b"".join(pieces[::3])
            for at in range(1, len(pieces), 3):
                if (pieces[at] is not None and pieces[at + 1] not in _PLAIN_CONNECTION_VALUES
                        and _names_headers(pieces[at + 1])):
                    relayed = None
                    break
        if relayed is not None:
            return relayed if keep_alive else relayed[:-2] + b"Connection: close\r\n\r\n"
    status = int(raw[9:12])
    return client_response_head(status, response_headers(raw), keep_alive=keep_alive)


def _names_headers(connection: bytes) -> bool:
    """Whether a Connection value names a header (anything but keep-alive and close)."""
    return connection.strip().lower() not in _CONNECTION_OPTIONS and not _CONNECTION_OPTIONS.issuperset(
        _tokens(connection))


def client_response_head(status: int, headers: Headers, *, keep_alive: bool, upgrade: bool = False) -> bytes:
    """The response head sent to the client: the upstream's end-to-end headers, our Connection."""
    parts = [status_line(status)]
    named: frozenset[bytes] = frozenset()
    for name, value in headers:
        if name.lower() == b"connection":
            named = named | frozenset(_tokens(value))
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_HOP_BY_HOP or lname in named:
            if upgrade and lname == b"upgrade":
                parts += (b"Upgrade: ", value, b"\r\n")
            continue
        parts += (name, b": ", value, b"\r\n")
    if upgrade:
        parts.append(b"Connection: Upgrade\r\n\r\n")
    else:
        parts.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    return b"".join(parts)


_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def bearer_credential(found: ClientHeaders, upgrade: bytes | None) -> bytes:
    """The key or token the client presents: `Authorization: Bearer`, or for a WebSocket without
    one, the bearer token subprotocol (browsers cannot set headers on a WebSocket)."""
    authorization = found.authorization
    if authorization is None:
        encoded = found.bearer_subprotocol
        if encoded is None or upgrade is None or upgrade.lower() != b"websocket":
            raise StatusError(401, "Unauthorized: a bearer access key is required")
        # Checked first: the decoder would skip characters outside the alphabet.
        if encoded.translate(None, _BASE64URL) or len(encoded) % 4 == 1:
            raise StatusError(401, "Unauthorized: the bearer token subprotocol is not base64url")
        token = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        if not token:
            raise StatusError(401, "Unauthorized: the bearer token subprotocol is empty")
        return token
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise StatusError(401, "Unauthorized: the Authorization header must be 'Bearer <access key>'")
    return token
