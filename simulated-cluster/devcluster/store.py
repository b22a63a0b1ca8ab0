"""In-memory object store: one increasing resourceVersion, a bounded change history, and watches."""
from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import random
import re
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastproxy.kube.selectors import EVERYTHING, Selection

from . import errors
from .discovery import NAMESPACES, STORED_RESOURCES, ResourceType

Object = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects

PROTECTED_NAMESPACES = frozenset({"default", "kube-system", "kube-public"})
NODE_NAME = "devcluster-node-1"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Change:
    """One stored change; `previous` is the object before it (None for ADDED)."""
    type: str  # ADDED, MODIFIED, DELETED
    resource: ResourceType
    object: Object
    previous: Object | None
    resource_version: int


class Watcher:
    """The queue of one open watch. Overflowing it closes the watch, as the API server drops a
    consumer that cannot keep up."""

    def __init__(self, resource: ResourceType, namespace: str | None, selection: Selection,
                 backlog: int = 1000):
        self.resource = resource
        self.namespace = namespace
        self.selection = selection
        self.closed = False
        self._capacity = backlog
        self._pending: deque[tuple[str, Object]] = deque()
        self._wakeup = asyncio.Event()

    def start_with(self, events: list[tuple[str, Object]]) -> None:
        self._pending.extend(events)
        self._capacity += len(events)

    def offer(self, change: Change) -> None:
        event = self.event_for(change)
        if event is None or self.closed:
            return
        if len(self._pending) >= self._capacity:
            self.close()
            return
        self._pending.append(event)
        self._wakeup.set()

    def event_for(self, change: Change) -> tuple[str, Object] | None:
        """Translate a change into what this watch sees: an object that starts or stops matching
        the selectors is ADDED or DELETED, as the API server's watch cache reports it."""
        if change.resource is not self.resource:
            return None
        if self.namespace is not None and change.object["metadata"].get("namespace") != self.namespace:
            return None
        now_matches = self.selection.matches(change.object)
        if change.type != "MODIFIED":
            return (change.type, change.object) if now_matches else None
        matched_before = self.selection.matches(change.previous)
        if now_matches and matched_before:
            return ("MODIFIED", change.object)
        if now_matches:
            return ("ADDED", change.object)
        if matched_before:
            return ("DELETED", change.object)
        return None

    @property
    def idle(self) -> bool:
        return not self._pending

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def next_event(self, timeout: float) -> tuple[str, Object] | None:
        """The next event, or None when `timeout` passes or the watch is closed."""
        if not self._pending and not self.closed:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return None
        return self._pending.popleft() if self._pending else None


@dataclass
class Page:
    items: list[Object]
    resource_version: int
    continue_token: str | None
    remaining: int | None


class Store:
    def __init__(self, history_size: int = 1000):
        self._objects: dict[tuple[str, str], dict[ObjectKey, Object]] = {
            rt.key: {} for rt in STORED_RESOURCES}
        self._resource_version = 0
        self._history: deque[Change] = deque(maxlen=history_size)
        # Every change with a resourceVersion above this is still in the history.
        self._history_floor = 0
        self._watchers: set[Watcher] = set()
        self._cluster_ip = itertools.count()
        self._pod_ip = itertools.count()

    @property
    def resource_version(self) -> int:
        return self._resource_version

    # Reads

    def get(self, rt: ResourceType, namespace: str, name: str) -> Object:
        obj = self._objects[rt.key].get((namespace if rt.namespaced else "", name))
        if obj is None:
            raise errors.not_found(rt.plural, name, rt.group)
        return copy.deepcopy(obj)

    def exists(self, rt: ResourceType, namespace: str, name: str) -> bool:
        return (namespace if rt.namespaced else "", name) in self._objects[rt.key]

    def list(self, rt: ResourceType, namespace: str | None, selection: Selection = EVERYTHING,
             limit: int = 0, continue_token: str | None = None) -> Page:
        list_version, after = self._resource_version, None
        if continue_token:
            list_version, after = self._decode_continue(continue_token)
        matching = [obj for key, obj in self._sorted(rt, namespace)
                    if (after is None or key > after) and selection.matches(obj)]
        page, rest = (matching[:limit], matching[limit:]) if limit > 0 else (matching, [])
        token = None
        if rest:
            last = page[-1]["metadata"]
            token = _encode_continue(list_version, (last.get("namespace", ""), last["name"]))
        return Page([copy.deepcopy(obj) for obj in page], list_version, token,
                    len(rest) if rest else None)

    def _sorted(self, rt: ResourceType, namespace: str | None) -> Iterator[tuple[ObjectKey, Object]]:
        for key in sorted(self._objects[rt.key]):
            if namespace is None or key[0] == namespace:
                yield key, self._objects[rt.key][key]

    def _decode_continue(self, token: str) -> tuple[int, ObjectKey]:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
            version, after = int(decoded["rv"]), (str(decoded["start"][0]), str(decoded["start"][1]))
        except (ValueError, KeyError, TypeError, IndexError):
            raise errors.bad_request(f"continue key is not valid: {token!r}") from None
        if version < self._history_floor:
            raise errors.expired(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter.")
        return version, after

    # Writes

    def create(self, rt: ResourceType, namespace: str, obj: Object) -> Object:
        obj = copy.deepcopy(obj)
        meta = _prepare_metadata(rt, obj, namespace)
        if rt.namespaced and not self.exists(NAMESPACES, "", namespace):
            raise errors.not_found("namespaces", namespace)
        if not meta.get("name"):
            meta["name"] = self._generate_name(rt, namespace, meta.get("generateName", ""))
        _validate(rt, obj)
        key = (meta.get("namespace", ""), meta["name"])
        if key in self._objects[rt.key]:
            raise errors.already_exists(rt.plural, meta["name"], rt.group)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_timestamp())
        meta.pop("deletionTimestamp", None)
        if rt.kind == "Deployment":
            meta["generation"] = 1
        self._apply_defaults(rt, obj)
        return self._commit(rt, key, "ADDED", obj, None)

    def update(self, rt: ResourceType, namespace: str, name: str, obj: Object) -> Object:
        """Replace an object. A resourceVersion in `obj` must be the current one (optimistic
        concurrency); without one the update is unconditional."""
        key = (namespace if rt.namespaced else "", name)
        current = self._objects[rt.key].get(key)
        if current is None:
            raise errors.not_found(rt.plural, name, rt.group)
        obj = copy.deepcopy(obj)
        meta = _prepare_metadata(rt, obj, namespace)
        if meta.get("name") != name:
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
        _validate(rt, obj)
        wanted_version = meta.get("resourceVersion")
        if wanted_version not in (None, "") and wanted_version != current["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, name, rt.group)
        old_meta = current["metadata"]
        for owned in ("uid", "creationTimestamp", "generation", "resourceVersion"):
            if owned in old_meta:
                meta[owned] = old_meta[owned]
            else:
                meta.pop(owned, None)
        if rt.has_status:
            obj["status"] = copy.deepcopy(current.get("status", {}))
        if "generation" in meta and obj.get("spec") != current.get("spec"):
            meta["generation"] += 1
        self._apply_defaults(rt, obj)
        if obj == current:
            return copy.deepcopy(current)  # a no-op update neither bumps the version nor notifies
        return self._commit(rt, key, "MODIFIED", obj, current)

    def delete(self, rt: ResourceType, namespace: str, name: str,
               preconditions: dict[str, Any] | None = None) -> Object:
        key = (namespace if rt.namespaced else "", name)
        current = self._objects[rt.key].get(key)
        if current is None:
            raise errors.not_found(rt.plural, name, rt.group)
        _check_preconditions(current, preconditions or {})
        if rt is NAMESPACES:
            if name in PROTECTED_NAMESPACES:
                raise errors.ApiError(
                    403, f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    name=name, kind="namespaces")
            for contained in STORED_RESOURCES:
                if contained.namespaced:
                    for contained_key, _ in list(self._sorted(contained, name)):
                        self._remove(contained, contained_key)
        return self._remove(rt, key)

    def delete_collection(self, rt: ResourceType, namespace: str | None,
                          selection: Selection) -> list[Object]:
        doomed = [key for key, obj in self._sorted(rt, namespace) if selection.matches(obj)]
        return [self._remove(rt, key) for key in doomed]

    def _remove(self, rt: ResourceType, key: ObjectKey) -> Object:
        previous = self._objects[rt.key][key]
        gone = copy.deepcopy(previous)
        return self._commit(rt, key, "DELETED", gone, previous)

    def _commit(self, rt: ResourceType, key: ObjectKey, change_type: str, obj: Object,
                previous: Object | None) -> Object:
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        obj = _in_conventional_order(obj)
        if change_type == "DELETED":
            del self._objects[rt.key][key]
        else:
            self._objects[rt.key][key] = obj
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0].resource_version
        change = Change(change_type, rt, obj, previous, self._resource_version)
        self._history.append(change)
        for watcher in list(self._watchers):
            watcher.offer(change)
        return copy.deepcopy(obj)

    def _generate_name(self, rt: ResourceType, namespace: str, prefix: str) -> str:
        if not prefix:
            raise errors.invalid(rt.kind, "", "metadata.name: Required value: name or generateName is "
                                 "required", rt.group)
        while True:
            name = prefix + "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            if not self.exists(rt, namespace, name):
                return name

    def _apply_defaults(self, rt: ResourceType, obj: Object) -> None:
        """Fill what the cluster's controllers would: a running pod, an active namespace..."""
        meta = obj["metadata"]
        if rt.kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = obj.get("status") or {"phase": "Active"}
        elif rt.kind == "Pod":
            spec = obj.setdefault("spec", {})
            spec.setdefault("nodeName", NODE_NAME)
            if not obj.get("status"):
                subnet, host = divmod(next(self._pod_ip), 250)
                pod_ip = f"10.244.{subnet}.{host + 2}"
                obj["status"] = running_pod_status(spec, meta["creationTimestamp"], pod_ip)
        elif rt.kind == "Secret":
            obj.setdefault("type", "Opaque")
        elif rt.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if "clusterIP" not in spec:
                subnet, host = divmod(next(self._cluster_ip), 250)
                spec["clusterIP"] = f"10.96.{subnet}.{host + 2}"
                spec["clusterIPs"] = [spec["clusterIP"]]
            obj["status"] = obj.get("status") or {"loadBalancer": {}}
        elif rt.kind == "Deployment":
            # Every rollout completes at once, so `kubectl rollout status` returns.
            replicas = obj.setdefault("spec", {}).setdefault("replicas", 1)
            obj["status"] = {"observedGeneration": meta.get("generation", 1), "replicas": replicas,
                             "readyReplicas": replicas, "updatedReplicas": replicas,
                             "availableReplicas": replicas}

    # Watches

    def watch(self, rt: ResourceType, namespace: str | None, selection: Selection,
              since: int | None) -> Watcher:
        """Open a watch. `since` None means "from now, after synthetic ADDED events for the current
        objects"; a version replays the later changes from history, or raises Expired when the
        history no longer reaches back that far."""
        watcher = Watcher(rt, namespace, selection)
        if since is None:
            initial = [("ADDED", obj) for _, obj in self._sorted(rt, namespace)
                       if selection.matches(obj)]
        else:
            if since < self._history_floor:
                raise errors.expired(f"too old resource version: {since} ({self._history_floor + 1})")
            initial = [event for change in self._history if change.resource_version > since
                       if (event := watcher.event_for(change))]
        # Stored objects are replaced on change, never mutated, so events can share them.
        watcher.start_with(initial)
        self._watchers.add(watcher)
        return watcher

    def stop_watch(self, watcher: Watcher) -> None:
        watcher.close()
        self._watchers.discard(watcher)

    def close_all_watches(self) -> None:
        for watcher in list(self._watchers):
            self.stop_watch(watcher)


def running_pod_status(spec: Object, started: str, pod_ip: str) -> Object:
    containers = spec.get("containers", [])
    return {
        "phase": "Running",
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                       for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
        "hostIP": "10.0.0.10",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": started,
        "containerStatuses": [
            {"name": c.get("name", ""), "image": c.get("image", ""), "ready": True, "restartCount": 0,
             "started": True, "state": {"running": {"startedAt": started}}}
            for c in containers],
    }


def _in_conventional_order(obj: Object) -> Object:
    head = {key: obj[key] for key in ("kind", "apiVersion", "metadata") if key in obj}
    return {**head, **{key: value for key, value in obj.items() if key not in head}}


def _encode_continue(version: int, after: ObjectKey) -> str:
    raw = json.dumps({"rv": version, "start": list(after)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _prepare_metadata(rt: ResourceType, obj: Object, namespace: str) -> Object:
    """Check kind/apiVersion/namespace against the URL and default them."""
    if not isinstance(obj, dict):
        raise errors.bad_request("the body of the request must be a JSON object")
    if obj.get("kind", rt.kind) != rt.kind or obj.get("apiVersion", rt.api_version) != rt.api_version:
        raise errors.bad_request(
            f"the API version in the data ({obj.get('apiVersion')}) and kind ({obj.get('kind')}) do not "
            f"match the expected {rt.api_version}, {rt.kind}")
    obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise errors.bad_request("metadata must be a JSON object")
    if rt.namespaced:
        if meta.get("namespace", namespace) != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    return meta


def _validate(rt: ResourceType, obj: Object) -> None:
    meta = obj["metadata"]
    name = meta["name"]
    pattern = _DNS_LABEL if rt.kind in ("Namespace", "Service") else _DNS_SUBDOMAIN
    if not isinstance(name, str) or len(name) > 253 or not pattern.match(name):
        raise errors.invalid(rt.kind, str(name), f'metadata.name: Invalid value: "{name}": a lowercase '
                             "RFC 1123 name must consist of lower case alphanumeric characters, '-' or '.'",
                             rt.group)
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is not None and not (isinstance(values, dict)
                                       and all(isinstance(v, str) for v in values.values())):
            raise errors.invalid(rt.kind, name, f"metadata.{field}: Invalid value: must map strings to "
                                 "strings", rt.group)
    if rt.kind == "Pod" and not obj.get("spec", {}).get("containers"):
        raise errors.invalid(rt.kind, name, "spec.containers: Required value", rt.group)


def _check_preconditions(current: Object, preconditions: dict[str, Any]) -> None:
    meta = current["metadata"]
    for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        wanted = preconditions.get(field)
        if wanted and wanted != meta.get(field):
            raise errors.ApiError(
                409, f"Precondition failed: {label} in precondition: {wanted}, {label} in object meta: "
                     f"{meta.get(field)}", name=meta["name"])


