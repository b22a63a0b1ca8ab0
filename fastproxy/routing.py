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

# Prefixes the product serves in later releases; until then they answer 404.
_NOT_YET_SERVED = {
    "auth": "the /auth/ endpoints are not served by this gateway yet",
    "oidc": "the /oidc/ endpoints are not served by this gateway yet",
    "grafana": "the /grafana/ proxy is not served by this gateway yet",
}
_KUBERNETES_NOT_YET_SERVED = {
    "management": "the management API is not served by this gateway yet",
    "virtualcluster": "virtual clusters are not served by this gateway yet",
}

CLUSTER = "cluster"
HEALTH = "health"


class Route(NamedTuple):
    kind: str
    cluster: str = ""
    path: str = "/"    # what the upstream receives: the normalised rest of the path
    query: str = ""    # unchanged, without the "?"


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
    parts = path.split("/", 4)  # "", first, second, third, rest
    first = parts[1]
    if first == "kubernetes" and len(parts) > 2:
        second = parts[2]
        if second == "cluster" and len(parts) > 3:
            name = parts[3]
            if not CLUSTER_NAME.match(name):
                raise StatusError(404, f"cluster name {name!r} is not valid")
            rest = "/" + parts[4] if len(parts) > 4 else "/"
            return Route(CLUSTER, name, rest, query)
        if second in _KUBERNETES_NOT_YET_SERVED:
            raise StatusError(404, _KUBERNETES_NOT_YET_SERVED[second])
    elif first in _NOT_YET_SERVED:
        raise StatusError(404, _NOT_YET_SERVED[first])
    elif path in ("/healthz", "/readyz", "/livez"):
        return Route(HEALTH, path=path)
    raise StatusError(404, f"the path {path!r} is not served by this gateway")
