"""Decoding of the Kubernetes protobuf request bodies kubectl sends for typed requests.

kubectl 1.32 posts `application/vnd.kubernetes.protobuf` for `kubectl create namespace|configmap|
secret|deployment|service ...` and `kubectl auth whoami|can-i`; everything else arrives as JSON.
The body is `k8s\\x00` + a runtime.Unknown envelope {typeMeta, raw}; `raw` is decoded here with
the field numbers of the kinds above into the JSON shape the rest of the devcluster stores.
Fields outside these schemas are not kept; zero values are dropped as JSON's omitempty does.
"""
from __future__ import annotations

import base64
from typing import Any, Union

from .errors import ApiError, bad_request

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"

# A schema maps field numbers to (JSON name, kind, repeated); a kind is a scalar name or a schema.
Schema = dict[int, tuple[str, Union[str, "Schema"], bool]]


def _fields(*entries: tuple) -> Schema:
    return {number: (name, kind, repeated) for number, name, kind, repeated in entries}


_STRING_MAP_ENTRY = "map"          # map<string, string>
_BYTES_MAP_ENTRY = "map_bytes"     # map<string, bytes>, base64 in JSON
_INT_OR_STRING = "int_or_string"

OBJECT_META = _fields(
    (1, "name", "string", False), (2, "generateName", "string", False),
    (3, "namespace", "string", False), (6, "resourceVersion", "string", False),
    (11, "labels", _STRING_MAP_ENTRY, False), (12, "annotations", _STRING_MAP_ENTRY, False),
    (14, "finalizers", "string", True),
)
LABEL_SELECTOR = _fields(
    (1, "matchLabels", _STRING_MAP_ENTRY, False),
    (2, "matchExpressions", _fields((1, "key", "string", False), (2, "operator", "string", False),
                                    (3, "values", "string", True)), True),
)
CONTAINER = _fields(
    (1, "name", "string", False), (2, "image", "string", False), (3, "command", "string", True),
    (4, "args", "string", True), (5, "workingDir", "string", False),
    (6, "ports", _fields((1, "name", "string", False), (2, "hostPort", "int", False),
                         (3, "containerPort", "int", False), (4, "protocol", "string", False)), True),
    (7, "env", _fields((1, "name", "string", False), (2, "value", "string", False)), True),
    (14, "imagePullPolicy", "string", False), (16, "stdin", "bool", False),
    (18, "tty", "bool", False),
)
POD_SPEC = _fields(
    (2, "containers", CONTAINER, True), (3, "restartPolicy", "string", False),
    (7, "nodeSelector", _STRING_MAP_ENTRY, False), (8, "serviceAccountName", "string", False),
    (10, "nodeName", "string", False),
)
SUBJECT_ACCESS_REVIEW_SPEC = _fields(
    (1, "resourceAttributes", _fields(
        (1, "namespace", "string", False), (2, "verb", "string", False), (3, "group", "string", False),
        (4, "version", "string", False), (5, "resource", "string", False),
        (6, "subresource", "string", False), (7, "name", "string", False)), False),
    (2, "nonResourceAttributes", _fields((1, "path", "string", False), (2, "verb", "string", False)), False),
    (3, "user", "string", False), (4, "groups", "string", True), (6, "uid", "string", False),
)

KINDS: dict[str, Schema] = {
    "Namespace": _fields((1, "metadata", OBJECT_META, False),
                         (2, "spec", _fields((1, "finalizers", "string", True)), False)),
    "ConfigMap": _fields((1, "metadata", OBJECT_META, False), (2, "data", _STRING_MAP_ENTRY, False),
                         (3, "binaryData", _BYTES_MAP_ENTRY, False), (4, "immutable", "bool", False)),
    "Secret": _fields((1, "metadata", OBJECT_META, False), (2, "data", _BYTES_MAP_ENTRY, False),
                      (3, "type", "string", False), (4, "stringData", _STRING_MAP_ENTRY, False),
                      (5, "immutable", "bool", False)),
    "Service": _fields((1, "metadata", OBJECT_META, False), (2, "spec", _fields(
        (1, "ports", _fields((1, "name", "string", False), (2, "protocol", "string", False),
                             (3, "port", "int", False), (4, "targetPort", _INT_OR_STRING, False),
                             (5, "nodePort", "int", False)), True),
        (2, "selector", _STRING_MAP_ENTRY, False), (3, "clusterIP", "string", False),
        (4, "type", "string", False), (5, "externalIPs", "string", True),
        (10, "externalName", "string", False)), False)),
    "Deployment": _fields((1, "metadata", OBJECT_META, False), (2, "spec", _fields(
        (1, "replicas", "int", False), (2, "selector", LABEL_SELECTOR, False),
        (3, "template", _fields((1, "metadata", OBJECT_META, False), (2, "spec", POD_SPEC, False)), False),
        (4, "strategy", _fields((1, "type", "string", False)), False)), False)),
    "SelfSubjectReview": _fields((1, "metadata", OBJECT_META, False)),
    "SelfSubjectAccessReview": _fields((1, "metadata", OBJECT_META, False),
                                       (2, "spec", SUBJECT_ACCESS_REVIEW_SPEC, False)),
    "SubjectAccessReview": _fields((1, "metadata", OBJECT_META, False),
                                   (2, "spec", SUBJECT_ACCESS_REVIEW_SPEC, False)),
}

_TYPE_META = _fields((1, "apiVersion", "string", False), (2, "kind", "string", False))
_ENVELOPE = _fields((1, "typeMeta", _TYPE_META, False), (2, "raw", "bytes", False))


def decode(body: bytes) -> dict[str, Any]:
    if not body.startswith(_MAGIC):
        raise bad_request("a protobuf body must start with the k8s\\x00 prefix")
    try:
        envelope = _decode_message(body[len(_MAGIC):], _ENVELOPE)
        type_meta = envelope.get("typeMeta", {})
        schema = KINDS.get(type_meta.get("kind", ""))
        if schema is None:
            raise ApiError(415, f"protobuf bodies are accepted for {', '.join(KINDS)}; send "
                                f"{type_meta.get('kind', 'this object')} as application/json")
        obj = _decode_message(envelope.get("raw", b""), schema)
    except (IndexError, ValueError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise bad_request(f"the protobuf body could not be decoded: {exc}") from None
    return {"kind": type_meta["kind"], "apiVersion": type_meta.get("apiVersion", ""), **obj}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _wire_fields(data: bytes):
    """(field number, value) pairs: ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
            if pos > len(data):
                raise ValueError("truncated field")
        elif wire_type in (1, 5):  # fixed64 / fixed32: not used by these kinds; skip
            width = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + width], pos + width
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield number, value


def _decode_message(data: bytes, schema: Schema) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for number, raw in _wire_fields(data):
        if number not in schema:
            continue
        name, kind, repeated = schema[number]
        if kind in (_STRING_MAP_ENTRY, _BYTES_MAP_ENTRY):
            entry = dict(_wire_fields(raw))
            key, value = entry.get(1, b"").decode(), entry.get(2, b"")
            text = value.decode() if kind == _STRING_MAP_ENTRY else base64.b64encode(value).decode()
            result.setdefault(name, {})[key] = text
            continue
        value = _scalar_or_message(raw, kind)
        if repeated:
            result.setdefault(name, []).append(value)
        elif value not in ("", 0, False, {}, None):
            result[name] = value
    return result


def _scalar_or_message(raw: Any, kind: Any) -> Any:
    if isinstance(kind, dict):
        return _decode_message(raw, kind)
    if kind == "string":
        return raw.decode()
    if kind == "bytes":
        return raw
    if kind == "int":
        return raw - (1 << 64) if raw >= 1 << 63 else raw
    if kind == "bool":
        return bool(raw)
    if kind == _INT_OR_STRING:
        fields = dict(_wire_fields(raw))
        return fields.get(3, b"").decode() if fields.get(1) == 1 else fields.get(2, 0)
    raise ValueError(f"unknown field kind {kind!r}")
