"""`meta.k8s.io/v1` Table rendering, which `kubectl get` asks for to print its columns."""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .discovery import ResourceType

Object = dict[str, Any]
Cell = Callable[[Object], Any]

def wants_table(accept: str) -> bool:
    """True when the first acceptable media type asks for a Table (`...;as=Table;g=meta.k8s.io;v=v1`)."""
    for media_type in accept.split(","):
        params = {p.strip().lower() for p in media_type.split(";")[1:]}
        if "as=table" in params:
            return "g=meta.k8s.io" in params and "v=v1" in params
        if media_type.split(";")[0].strip() in ("application/json", "*/*", "application/*"):
            return False
    return False


def human_duration(seconds: float) -> str:
    """Age the way kubectl prints it: 45s, 3m12s, 17m, 2h5m, 5h, 3d4h, 40d, 2y30d."""
    seconds = max(int(seconds), 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        years = days // 365
        return f"{years}y{days % 365}d" if days % 365 else f"{years}y"
    return f"{days // 365}y"


def _age(obj: Object) -> str:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    started = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return human_duration((datetime.now(UTC) - started).total_seconds())


def _path(*keys: str, default: Any = "<none>") -> Cell:
    def cell(obj: Object) -> Any:
        node: Any = obj
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return default if node in (None, "") else node
    return cell


def _pod_ready(pod: Object) -> str:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ready = sum(1 for status in statuses if status.get("ready"))
    return f"{ready}/{len(pod.get('spec', {}).get('containers', []))}"


def _pod_restarts(pod: Object) -> int:
    return sum(s.get("restartCount", 0) for s in pod.get("status", {}).get("containerStatuses", []))


def _service_ports(service: Object) -> str:
    ports = service.get("spec", {}).get("ports", [])
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _deployment_ready(deployment: Object) -> str:
    status = deployment.get("status", {})
    return f"{status.get('readyReplicas', 0)}/{deployment.get('spec', {}).get('replicas', 1)}"


def _column(name: str, cell: Cell, *, kind: str = "string", fmt: str = "", priority: int = 0,
            description: str = "") -> tuple[dict[str, Any], Cell]:
    return ({"name": name, "type": kind, "format": fmt, "description": description or name,
             "priority": priority}, cell)


_NAME = _column("Name", _path("metadata", "name"), fmt="name",
                description="Name must be unique within a namespace.")
_AGE = _column("Age", _age, description="CreationTimestamp is the time this object was created.")

_COLUMNS: dict[str, list[tuple[dict[str, Any], Cell]]] = {
    "Namespace": [_NAME, _column("Status", _path("status", "phase")), _AGE],
    "Pod": [
        _NAME,
        _column("Ready", _pod_ready),
        _column("Status", _path("status", "phase")),
        _column("Restarts", _pod_restarts, kind="integer"),
        _AGE,
        _column("IP", _path("status", "podIP"), priority=1),
        _column("Node", _path("spec", "nodeName"), priority=1),
    ],
    "ConfigMap": [_NAME, _column("Data", lambda cm: len(cm.get("data", {})) + len(cm.get("binaryData", {})),
                                 kind="integer"), _AGE],
    "Secret": [_NAME, _column("Type", _path("type")),
               _column("Data", lambda secret: len(secret.get("data", {})), kind="integer"), _AGE],
    "Service": [
        _NAME,
        _column("Type", _path("spec", "type")),
        _column("Cluster-IP", _path("spec", "clusterIP")),
        _column("External-IP", lambda svc: ",".join(svc.get("spec", {}).get("externalIPs", [])) or "<none>"),
        _column("Port(s)", _service_ports),
        _AGE,
    ],
    "Deployment": [
        _NAME,
        _column("Ready", _deployment_ready),
        _column("Up-to-date", _path("status", "updatedReplicas", default=0), kind="integer"),
        _column("Available", _path("status", "availableReplicas", default=0), kind="integer"),
        _AGE,
    ],
}


def table(rt: ResourceType, objects: list[Object], *, include_object: str = "Metadata",
          list_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Table of `objects`; `include_object` is the `includeObject` query parameter
    (None, Metadata or Object) saying what each row carries besides its cells."""
    columns = _COLUMNS.get(rt.kind, [_NAME, _AGE])
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [cell(obj) for _, cell in columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata or {},
            "columnDefinitions": [definition for definition, _ in columns], "rows": rows}
