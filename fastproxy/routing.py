"""From a raw request target to a route: pure, and strict about ambiguous paths.

The path is normalised before anything looks at it, and the upstream receives the normalised
form, so what the gateway routes and authorises is exactly what the cluster serves: doubled
slashes collapse, `.` segments go, while `..` segments and encoded `/`, `\\` or NUL (which
other servers may decode differently) are refused.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .status import StatusError

# Cluster names are Kubernetes object names (DNS-1123 subdomains).
CLUSTER_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_HOSTILE_ESCAPES = ("%2f", "%5c", "%00")
_DOT_SEGMENTS = frozenset((".", "%2e"))
_DOTDOT_SEGMENTS = frozenset(("..", ".%2e", "%2e.", "%2e%2e"))

# Route kinds: what the router table maps a prefix to; the gateway maps each kind to a handler.
CLUSTER = "cluster"
VIRTUAL_CLUSTER = "virtualcluster"
MANAGEMENT = "management"
AUTH = "auth"
OIDC = "oidc"
GRAFANA = "grafana"
HEALTH = "health"


class Prefix(NamedTuple):
    segments: tuple[str, ...]  # the fixed leading path segments
    kind: str
    names: int = 0             # DNS-name segments after them (cluster, namespace, virtual cluster)
    exact: bool = False        # the path is the prefix itself, nothing below it


# The router table, longest prefixes first. The names a prefix takes are DNS-1123 names.
ROUTES = (
    Prefix(("kubernetes", "cluster"), CLUSTER, names=1),
    Prefix(("kubernetes", "virtualcluster"), VIRTUAL_CLUSTER, names=3),
    Prefix(("kubernetes", "management"), MANAGEMENT),
    Prefix(("auth",), AUTH),
    Prefix(("oidc",), OIDC),
    Prefix(("grafana",), GRAFANA, names=1),
    Prefix(("healthz",), HEALTH, exact=True),
    Prefix(("readyz",), HEALTH, exact=True),
    Prefix(("livez",), HEALTH, exact=True),
)
_BY_FIRST: dict[str, tuple[Prefix, ...]] = {}
for _prefix in ROUTES:
    _BY_FIRST[_prefix.segments[0]] = _BY_FIRST.get(_prefix.segments[0], ()) + (_prefix,)

# What a prefix whose handler this gateway does not run answers (404).
NOT_SERVED = {
    CLUSTER: "no cluster is served by this gateway",
    VIRTUAL_CLUSTER: "virtual clusters are not served by this gateway yet",
    MANAGEMENT: "the management API is not served by this gateway yet",
    AUTH: "the /auth/ endpoints are not served by this gateway yet",
    OIDC: "the /oidc/ endpoints are not served by this gateway yet",
    GRAFANA: "the /grafana/ proxy is not served by this gateway yet",
}


class Route(NamedTuple):
    kind: str
    cluster: str = ""
    path: str = "/"    # what the handler serves: the normalised rest of the path below the prefix
    query: str = ""    # unchanged, without the "?"
    namespace: str = ""        # virtual clusters: the host namespace
    virtual_cluster: str = ""  # virtual clusters: the name


def split_target(target: str) -> tuple[str, str]:
    path, sep, query = target.partition("?")
    if "#" in path:
        raise StatusError(400, "request target must not contain a fragment")
    return path, query


def normalise_path(path: str) -> str:
    if not path.startswith("/"):
        raise StatusError(400, "request target must be an absolute path")
    if "//" not in path and "/." not in path and "%" not in path and "\\" not in path:
        return path
    if "\\" in path:
        raise StatusError(400, "request path must not contain a backslash")
    lowered = path.lower()
    for escape in _HOSTILE_ESCAPES:
        if escape in lowered:
            raise StatusError(400, f"request path must not contain the escape {escape.upper()}")
    segments = []
    for segment in path.split("/"):
        folded = segment.lower()
        if not segment or folded in _DOT_SEGMENTS:
            continue
        if folded in _DOTDOT_SEGMENTS:
            raise StatusError(400, "request path must not contain '..' segments")
        segments.append(segment)
    trailing = "/" if path.endswith("/") and segments else ""
    return "/" + "/".join(segments) + trailing


def route(target: str) -> Route:
    """Map a raw request target to a Route, or raise StatusError (400 for hostile paths, 404)."""
    raw_path, query = split_target(target)
    path = normalise_path(raw_path)
    parts = path.split("/")[1:]  # "/a/b/" -> ["a", "b", ""]
    for prefix in _BY_FIRST.get(parts[0], ()):
        fixed = len(prefix.segments)
        if tuple(parts[:fixed]) != prefix.segments:
            continue
        if prefix.exact:
            if len(parts) == fixed:
                return Route(prefix.kind, path=path, query=query)
            continue
        names = parts[fixed:fixed + prefix.names]
        if len(names) < prefix.names:
            raise StatusError(404, f"the path {path!r} names no {prefix.kind} (expected /{'/'.join(prefix.segments)}/NAME/...)")
        for name in names:
            if not CLUSTER_NAME.match(name):
                raise StatusError(404, f"{prefix.kind} name {name!r} is not valid")
        below = parts[fixed + prefix.names:]
        rest = "/" + "/".join(below) if below else "/"
        cluster = names[0] if names else ""
        if prefix.kind == VIRTUAL_CLUSTER:
            return Route(prefix.kind, cluster, rest, query, names[1], names[2])
        return Route(prefix.kind, cluster, rest, query)
    raise StatusError(404, f"the path {path!r} is not served by this gateway")
