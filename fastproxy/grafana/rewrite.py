"""What changes between the client and Grafana: pure functions over header lists and heads.

Towards Grafana the gateway removes the client's credential (Authorization, the access-key cookie)
and every auth-proxy header a client might forge, and adds its own naming the caller. Back
towards the client, `Location` and cookie paths move under `/grafana/CLUSTER`, where the browser
sees Grafana, and Grafana may not set the gateway's own cookie.
"""
from __future__ import annotations

from ..headers import Headers, response_headers
from ..status import StatusError

# Auth-proxy headers (Grafana's `headers = Name:X-WEBAUTH-NAME Role:X-WEBAUTH-ROLE ...` convention)
# are never taken from a client, whichever of them a Grafana is set to read.
_AUTH_PROXY_PREFIX = b"x-webauth-"


def grafana_request_headers(kept: Headers, forged: frozenset[bytes], cookie: bytes) -> tuple[Headers, bytes | None]:
    """The client's forwardable headers (headers.scan_client_headers' `kept`) less the
    auth-proxy headers (`forged`: their lower-case names) and the access-key cookie, and that
    cookie's value (the browser's credential), if there was one; StatusError 401 for two."""
    headers: Headers = []
    credential = None
    for name, value in kept:
        lname = name.lower()
        if lname in forged or lname.startswith(_AUTH_PROXY_PREFIX):
            continue
        if lname == b"cookie":
            pairs = []
            for pair in value.split(b";"):
                key, _, cookie_value = pair.partition(b"=")
                if key.strip() == cookie:
                    if credential is not None:  # which one the browser meant cannot be told
                        raise StatusError(401, "Unauthorized: more than one access-key cookie")
                    credential = cookie_value.strip().strip(b'"')
                elif pair.strip():
                    pairs.append(pair.strip())
            if not pairs:
                continue
            value = b"; ".join(pairs)
        headers.append((name, value))
    return headers, credential


def from_own_site(headers: Headers) -> bool:
    """Whether a browser's request comes from a page of the gateway itself: its `Origin` names
    the host it was sent to. A request without Origin does not pass (browsers send it on every
    POST and WebSocket), so another site's page cannot act with the visitor's cookie."""
    origin = host = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"origin":
            origin = value.strip()
        elif lname == b"host":
            host = value.strip()
    if origin is None or host is None:
        return False
    scheme, _, authority = origin.partition(b"://")
    return scheme.lower() in (b"https", b"http") and authority.lower() == host.lower()


def auth_proxy_lines(user_header: bytes, user: str, groups_header: bytes, groups: tuple[str, ...]) -> bytes:
    """The header lines telling Grafana who the caller is. Grafana splits the groups on commas,
    so a group whose name holds one is left out rather than read as two."""
    lines = user_header + b": " + user.encode() + b"\r\n"
    listed = [group for group in groups if "," not in group]
    if groups_header and listed:
        lines += groups_header + b": " + ",".join(listed).encode() + b"\r\n"
    return lines


def rewrite_location(value: bytes, prefix: bytes, origin: bytes) -> bytes:
    """A redirect to Grafana itself (a path, or Grafana's own origin) as the path under `prefix`;
    a redirect elsewhere (a login provider) and a relative one stay as they are."""
    if value.lower().startswith(origin + b"/") or value.lower() == origin:
        value = value[len(origin):] or b"/"
    if value.startswith(b"/") and not value.startswith(b"//"):
        return under(prefix, value)
    return value


def under(prefix: bytes, path: bytes) -> bytes:
    """`path` below `prefix`; unchanged if it is there already (a Grafana whose root_url names
    the gateway's sub-path redirects and sets cookies there itself)."""
    if path == prefix or path.startswith(prefix + b"/"):
        return path
    return prefix + path


def rewrite_set_cookie(value: bytes, prefix: bytes, gateway_cookie: bytes) -> bytes | None:
    """A Grafana cookie confined to `prefix` (its Path moved under it, its Domain dropped), or None
    for one that would replace the gateway's own access-key cookie."""
    attributes = [attribute.strip() for attribute in value.split(b";")]
    if attributes[0].partition(b"=")[0].strip() == gateway_cookie:
        return None
    kept = [attributes[0]]
    for attribute in attributes[1:]:
        name, _, path = attribute.partition(b"=")
        lname = name.strip().lower()
        if lname == b"domain":
            continue
        if lname == b"path":
            path = path.strip()
            attribute = b"Path=" + under(prefix, path if path.startswith(b"/") else b"/")
        kept.append(attribute)
    return b"; ".join(kept)


def rewrite_response_head(raw: bytes, prefix: bytes, origin: bytes, gateway_cookie: bytes) -> bytes:
    """Grafana's response head with its Location and Set-Cookie headers rewritten (the same bytes
    when it has neither); the status line is kept as it came."""
    lowered = raw.lower()
    if b"\r\nlocation:" not in lowered and b"\r\nset-cookie:" not in lowered:
        return raw
    lines = [raw[:raw.index(b"\r\n")]]
    for name, value in response_headers(raw):
        lname = name.lower()
        if lname == b"location":
            value = rewrite_location(value, prefix, origin)
        elif lname == b"set-cookie":
            rewritten = rewrite_set_cookie(value, prefix, gateway_cookie)
            if rewritten is None:
                continue
            value = rewritten
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
