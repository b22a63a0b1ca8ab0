"""What a Kubernetes request asks for (verb, resource, namespace, name), as the API server sees it.

Pure and called on every request, so it splits strings instead of matching regular expressions
and only parses the query for the one case that needs it (a GET without a name: list or watch).
"""
from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple
from urllib.parse import unquote_plus


class RequestTarget(StrEnum):
    """Which API server a request is for (the Loft request target names)."""

    Management = "Management"
    Cluster = "Cluster"
    VirtualCluster = "VirtualCluster"
    ProjectSpace = "ProjectSpace"
    ProjectVirtualCluster = "ProjectVirtualCluster"


class RequestInfo(NamedTuple):
    """Immutable and slotted; a NamedTuple because it builds ~5x faster than a frozen dataclass."""

    is_resource_request: bool
    path: str
    verb: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: tuple[str, ...] = ()


_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update",
                 "PATCH": "patch", "DELETE": "delete"}
# Legacy path verbs: /api/v1/watch/... and /api/v1/proxy/...; proxy takes no subresource.
_PATH_VERBS = frozenset(("watch", "proxy"))
# The paths below namespaces/NS that are the namespace's own subresources, not resources in it.
_NAMESPACE_SUBRESOURCES = frozenset(("status", "finalize"))


def request_info(method: str, path: str, query: str) -> RequestInfo:
    """Describe a request by its method, cluster-relative path and raw query string."""
    parts = path.strip("/").split("/")
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return RequestInfo(False, path, method.lower())
    prefix = parts[0]
    if prefix == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) < 4:
        return RequestInfo(False, path, method.lower())
    else:
        group, version, rest = parts[1], parts[2], parts[3:]

    if rest[0] in _PATH_VERBS:
        if len(rest) < 2:  # the API server cannot place such a request; nothing more is known
            return RequestInfo(True, path, method.lower(), prefix, group, version)
        verb, rest = rest[0], rest[1:]
    else:
        verb = _METHOD_VERBS.get(method, "")

    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]

    count = len(rest)
    resource = rest[0]
    name = rest[1] if count > 1 else ""
    subresource = rest[2] if count > 2 and verb != "proxy" else ""

    if not name:
        if verb == "get":
            verb, name = _list_or_watch(query)
        elif verb == "delete":
            verb = "deletecollection"
    return RequestInfo(True, path, verb, prefix, group, version, namespace, resource,
                       subresource, name, tuple(rest))


def request_verb(method: str, path: str, query: str) -> str:
    """`request_info(method, path, query).verb` for a normalised path (no empty segments), in a
    third of its time: the same steps, keeping only what decides the verb (the API prefix, a path
    verb, the namespace, and whether a name follows the resource)."""
    parts = path.strip("/").split("/")
    count = len(parts)
    first = parts[0]
    if first == "api" and count > 2:
        i = 2
    elif first == "apis" and count > 3:
        i = 3
    else:
        return method.lower()
    verb = parts[i]
    if verb in _PATH_VERBS:
        if count - i < 2:
            return method.lower()
        i += 1
    else:
        verb = _METHOD_VERBS.get(method, "")
    if parts[i] == "namespaces" and count - i > 2 and parts[i + 2] not in _NAMESPACE_SUBRESOURCES:
        i += 2
    if count - i > 1:  # a name follows the resource
        return verb
    if verb == "get":
        return _list_or_watch(query)[0]
    return "deletecollection" if verb == "delete" else verb


def _list_or_watch(query: str) -> tuple[str, str]:
    """The verb of a GET without a name, and the name an exact metadata.name selector gives it."""
    # An escaped key could spell "watch", so only a query without "%" may skip the parse.
    if not query or ("watch" not in query and "fieldSelector" not in query and "%" not in query):
        return "list", ""
    watch_value = selector = None
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if key == "watch" and watch_value is None:
            watch_value = unquote_plus(value)
        elif key == "fieldSelector" and selector is None:
            selector = unquote_plus(value)
    # Any value but "0" or "false" (in any case) means watch, as the API server reads booleans.
    verb = "list" if watch_value is None or watch_value.lower() in ("0", "false") else "watch"
    name = _exact_name(selector) if selector and "metadata.name" in selector else ""
    return verb, name


def _exact_name(selector: str) -> str:
    """The value of the first `metadata.name=X` (or `==`) term, "" if none or if malformed.

    A malformed selector makes the API server ignore the whole selector, so it gives no name.
    Terms are compared in sorted order, as the API server parses them.
    """
    found = None
    for term in sorted(_split_unescaped(selector, ",")):
        if not term:
            continue
        field, operator, value = _split_term(term)
        if operator is None:
            return ""
        value = _unescape(value)
        if value is None:
            return ""
        if found is None and field == "metadata.name" and operator != "!=":
            found = value
    # A name must be usable as one path segment.
    if found is None or found in (".", "..") or "/" in found or "%" in found:
        return ""
    return found


def _split_unescaped(text: str, separator: str) -> list[str]:
    if "\\" not in text:
        return text.split(separator)
    pieces, start, index = [], 0, 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == separator:
            pieces.append(text[start:index])
            start = index + 1
        index += 1
    pieces.append(text[start:])
    return pieces


def _split_term(term: str) -> tuple[str, str | None, str]:
    """Split at the first operator: "!=", "==" or "="."""
    index = term.find("=")
    if index < 0:
        return term, None, ""
    if index > 0 and term[index - 1] == "!":
        return term[:index - 1], "!=", term[index + 1:]
    if term.startswith("==", index):
        return term[:index], "==", term[index + 2:]
    return term[:index], "=", term[index + 1:]


def _unescape(value: str) -> str | None:
    """Undo selector escaping (\\\\, \\, and \\=); None for any other escape."""
    if "\\" not in value:
        return value
    out, index = [], 0
    while index < len(value):
        char = value[index]
        if char == "\\":
            if index + 1 >= len(value) or value[index + 1] not in "\\,=":
                return None
            char = value[index + 1]
            index += 1
        out.append(char)
        index += 1
    return "".join(out)


def is_discovery(info: RequestInfo) -> bool:
    """Version, API discovery and OpenAPI documents: they reveal no objects, the API server lets
    every authenticated user read them, and kubectl needs them before any other request."""
    if info.is_resource_request or info.verb != "get":
        return False
    parts = info.path.strip("/").split("/")
    first = parts[0]
    if first == "api":
        return len(parts) <= 2
    if first == "apis":
        return len(parts) <= 3
    return (first == "version" and len(parts) == 1) or first == "openapi"
