"""PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch.

The strategic merge patch is a merge patch that also understands what `kubectl apply` sends for
lists of named objects (containers, env, volumes...): elements are merged by `name`, removed by a
`{"$patch": "delete"}` element and ordered by `$setElementOrder/<field>`; other `$` directives
are dropped rather than stored.
"""
from __future__ import annotations

import copy
from typing import Any

from ..status import StatusError

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
SUPPORTED = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    if content_type == MERGE_PATCH:
        return _merge(target, patch, strategic=False)
    if content_type == STRATEGIC_MERGE_PATCH:
        return _merge(target, patch, strategic=True)
    if content_type == JSON_PATCH:
        return _json_patch(target, patch)
    raise unsupported_media_type()


def unsupported_media_type() -> StatusError:
    return StatusError(415, "the body of the request was in an unknown format - accepted media types "
                         f"include: {', '.join(SUPPORTED)}")


def _merge(target: Any, patch: Any, *, strategic: bool) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif strategic and _is_named_list(value) and _is_named_list(result.get(key)):
            result[key] = _merge_named_list(result[key], value, patch.get(f"$setElementOrder/{key}"))
        elif strategic and isinstance(value, list):
            result[key] = [_merge({}, item, strategic=True) if isinstance(item, dict) else item
                           for item in value if not _is_delete_directive(item)]
        else:
            result[key] = _merge(result.get(key), value, strategic=strategic)
    return result


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def _merge_named_list(current: list[dict], patch: list[dict], order: Any) -> list[dict]:
    merged = {item["name"]: item for item in current}
    for item in patch:
        name = item["name"]
        if _is_delete_directive(item):
            merged.pop(name, None)
        else:
            merged[name] = _merge(merged.get(name, {}), item, strategic=True)
    if _is_named_list(order):
        ranked = {entry["name"]: rank for rank, entry in enumerate(order)}
        return sorted(merged.values(), key=lambda item: ranked.get(item["name"], len(ranked)))
    return list(merged.values())


def _is_delete_directive(item: Any) -> bool:
    return isinstance(item, dict) and item.get("$patch") == "delete"


def _json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    if not isinstance(operations, list):
        raise StatusError(400, "a JSON patch must be a list of operations")
    doc: Any = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise StatusError(400, f"invalid JSON patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        if op == "test":
            if _get(doc, path) != operation.get("value"):
                raise StatusError(422, f"testing value {path} failed")
        elif op == "remove":
            _remove(doc, path)
        elif op == "add":
            doc = _add(doc, path, copy.deepcopy(operation.get("value")))
        elif op == "replace":
            _get(doc, path)  # the target must exist
            _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(operation.get("value")))
        elif op in ("move", "copy"):
            value = copy.deepcopy(_get(doc, operation.get("from", "")))
            if op == "move":
                _remove(doc, operation["from"])
            doc = _add(doc, path, value)
        else:
            raise StatusError(400, f"unknown JSON patch operation: {op!r}")
    return doc


def _split(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise StatusError(400, f"invalid JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        doc = _child(doc, part, path)
    return doc


def _child(node: Any, part: str, path: str) -> Any:
    try:
        if isinstance(node, list):
            return node[int(part)]
        return node[part]
    except (KeyError, IndexError, ValueError, TypeError):
        raise StatusError(422, f"the JSON patch path {path!r} does not exist") from None


def _get(doc: Any, path: str) -> Any:
    return _walk(doc, _split(path), path)


def _remove(doc: Any, path: str) -> None:
    parts = _split(path)
    if not parts:
        raise StatusError(400, "cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    _child(parent, parts[-1], path)
    del parent[int(parts[-1]) if isinstance(parent, list) else parts[-1]]


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _split(path)
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else _list_index(last, len(parent), path)
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise StatusError(422, f"the JSON patch path {path!r} does not exist")
    return doc


def _list_index(part: str, length: int, path: str) -> int:
    if not part.isdigit() or int(part) > length:
        raise StatusError(422, f"the JSON patch path {path!r} does not exist")
    return int(part)
