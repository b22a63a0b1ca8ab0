"""From a raw request target to a route: pure, and strict about ambiguous paths.

The path is normalised before anything looks at it, and the upstream receives the normalised
form, so what the gateway routes and authorises is exactly what the cluster serves: doubled
slashes collapse, `.` segments go, while `..` segments and encoded `/`, `\\` or NUL (which
other servers may decode differently) are refused.
"""
from __future__ import annotations

from typing import NamedTuple

from .names import DNS_SUBDOMAIN
from .status import StatusError

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
METRICS = "metrics"
UI = "ui"


class Prefix(NamedTuple):
    text: str          # the fixed leading path, "/" at both ends
    kind: str
    names: int = 0     # DNS-name segments after it (cluster, namespace, virtual cluster)
    exact: bool = False  # the path is the prefix itself (without its last "/"), nothing below it


# The router table, the cluster proxy (nearly every request) first. Names are DNS-1123 names.
ROUTES = (
    Prefix("/kubernetes/cluster/", CLUSTER, names=1),
    Prefix("/kubernetes/virtualcluster/", VIRTUAL_CLUSTER, names=3),
    Prefix("/kubernetes/management/", MANAGEMENT),
    Prefix("/auth/", AUTH),
    Prefix("/oidc/", OIDC),
    Prefix("/grafana/", GRAFANA, names=1),
    Prefix("/healthz/", HEALTH, exact=True),
    Prefix("/readyz/", HEALTH, exact=True),
    Prefix("/livez/", HEALTH, exact=True),
    Prefix("/metrics/", METRICS, exact=True),
    Prefix("/ui/", UI),
)

_CLUSTER_PREFIX = ROUTES[0].text

# What a prefix whose handler this gateway does not run answers (404).
NOT_SERVED = {
    CLUSTER: "no cluster is served by this gateway",
    VIRTUAL_CLUSTER: "virtual clusters are not served by this gateway yet",
    MANAGEMENT: "the management API is not served by this gateway yet",
    AUTH: "the /auth/ endpoints are not served by this gateway yet",
    OIDC: "no OpenID Connect provider is configured on this gateway ([oidc])",
    GRAFANA: "no Grafana is configured on this gateway ([grafana])",
    METRICS: "metrics are disabled on this gateway ([metrics] enabled = false)",
    UI: "the status page is disabled on this gateway ([ui] enabled = false)",
}


class Route(NamedTuple):
    kind: str
    cluster: str = ""
    path: str = "/"    # what the handler serves: the normalised rest of the path below the prefix
    query: str = ""    # unchanged, without the "?"
    namespace: str = ""        # virtual clusters: the host namespace
    virtual_cluster: str = ""  # virtual clusters: the name


_new_tuple = tuple.__new__


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
    raw_path, _, query = target.partition("?")
    if "#" in raw_path:
        raise StatusError(400, "request target must not contain a fragment")
    path = normalise_path(raw_path)
    if path.startswith(_CLUSTER_PREFIX):
        # The table's first row, without the loop: nearly every request is for a cluster.
        name, slash, rest = path[len(_CLUSTER_PREFIX):].partition("/")
        if name and DNS_SUBDOMAIN.match(name):
            # tuple.__new__ itself: the named tuple's own __new__ is a Python frame more.
            return _new_tuple(Route, (CLUSTER, name, slash + rest if slash else "/", query, "", ""))
    for prefix in ROUTES:
        text = prefix.text
        if not path.startswith(text):
            if path == text[:-1]:
                remainder = ""
            else:
                continue
        elif prefix.exact:
            continue
        else:
            remainder = path[len(text):]
        if prefix.exact:
            return Route(prefix.kind, path=path, query=query)
        if not prefix.names:
            return Route(prefix.kind, path="/" + remainder, query=query)
        pieces = remainder.split("/", prefix.names)
        if len(pieces) < prefix.names or not remainder:
            raise StatusError(404, f"the path {path!r} names no {prefix.kind} (expected {text}NAME/...)")
        for name in pieces[:prefix.names]:
            if not DNS_SUBDOMAIN.match(name):
                raise StatusError(404, f"{prefix.kind} name {name!r} is not valid")
        rest = "/" + pieces[prefix.names] if len(pieces) > prefix.names else "/"
        if prefix.kind == VIRTUAL_CLUSTER:
            return Route(prefix.kind, pieces[0], rest, query, pieces[1], pieces[2])
        return Route(prefix.kind, pieces[0], rest, query)
    raise StatusError(404, f"the path {path!r} is not served by this gateway")
