"""Request bodies of the management API: JSON or YAML objects, and PATCH documents, decoded safely.

YAML goes through PyYAML's C safe loader, and its node graph is checked before any Python object
is built: an alias (`*name`) could make a few bytes stand for an exponential tree (the "billion
laughs" bomb), and Kubernetes objects never need one, so aliases are refused outright.
"""
from __future__ import annotations

from typing import Any

import orjson
import yaml

from ..kube.patch import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from ..status import StatusError

JSON = "application/json"
YAML = "application/yaml"
YAML_TYPES = frozenset((YAML, "application/x-yaml", "text/yaml"))
PATCH_TYPES = frozenset((JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH))
APPLY_PATCH = "application/apply-patch+yaml"
MAX_YAML_NODES = 100_000  # far above any management object, far below a memory problem


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def decode_object(raw: bytes, content_type: str) -> dict[str, Any]:
    """The object a create or update sends; StatusError 400/415 when it is not one."""
    kind = media_type(content_type) or JSON
    if kind == JSON:
        value = _json(raw)
    elif kind in YAML_TYPES:
        value = _yaml(raw)
    else:
        raise StatusError(415, f"the body of the request was in an unknown format ({kind}) - accepted media "
                               f"types include: {JSON}, {YAML}")
    if not isinstance(value, dict):
        raise StatusError(400, "the request body must be an object")
    return value


def decode_patch(raw: bytes, content_type: str) -> tuple[str, Any]:
    """(patch type, patch document) of a PATCH request."""
    kind = media_type(content_type)
    if kind == APPLY_PATCH:
        raise StatusError(415, "server-side apply is not supported by the management API; use kubectl apply "
                               "without --server-side")
    if kind not in PATCH_TYPES:
        raise StatusError(415, f"the body of the request was in an unknown format ({kind or 'none'}) - accepted "
                               f"media types include: {', '.join(sorted(PATCH_TYPES))}")
    return kind, _json(raw)


def decode_options(raw: bytes, content_type: str) -> dict[str, Any]:
    """DeleteOptions: optional, so an empty body is no options."""
    return decode_object(raw, content_type) if raw.strip() else {}


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise StatusError(400, f"the request body is not valid JSON: {error}") from None


def _yaml(raw: bytes) -> Any:
    loader = yaml.CSafeLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            raise StatusError(400, "the request body is empty")
        _check_nodes(node)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise StatusError(400, f"the request body is not valid YAML: {_one_line(error)}") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node) -> None:
    """Refuse aliases (a node reached twice) and oversized documents, without recursion."""
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            raise StatusError(400, "YAML aliases are not allowed in a request body")
        seen.add(id(node))
        if len(seen) > MAX_YAML_NODES:
            raise StatusError(400, f"the YAML request body has more than {MAX_YAML_NODES} nodes")
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                pending += (key, value)
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
