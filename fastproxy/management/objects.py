"""The state store's users, teams and access keys as management.loft.sh/v1 objects, and back.

Pure functions over plain data. An access key's secret never appears here: the store holds only
its digest, and `ownedaccesskeys` show it once, in the create response (api.py adds it there).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..store import AccessKey, NamespaceActivity, Snapshot, Team, User, VirtualClusterInstance
from .watch import Event

API_VERSION = "management.loft.sh/v1"

# API field -> (store field, value when absent): what a create or update of each kind sets.
USER_SPEC = {"username": ("username", ""), "displayName": ("display_name", ""), "email": ("email", ""),
             "subject": ("subject", ""), "groups": ("groups", ()), "disabled": ("disabled", False),
             "description": ("description", "")}
TEAM_SPEC = {"displayName": ("display_name", ""), "description": ("description", ""), "users": ("members", ()),
             "groups": ("groups", ())}
KEY_SPEC = {"displayName": ("display_name", ""), "description": ("description", ""), "disabled": ("disabled", False),
            "scope": ("scope", None)}
# The token is write-only and set apart (instance_changes): absent in an update, it stays.
INSTANCE_SPEC = {"displayName": ("display_name", ""), "description": ("description", ""), "cluster": ("cluster", ""),
                 "server": ("server", ""), "caData": ("ca_data", "")}
# Fields of an owned access key fixed at creation (the rest of KEY_SPEC may be updated).
KEY_CREATE_SPEC = {"ttl": ("ttl", 0), "ttlAfterLastActivity": ("ttl_after_last_activity", False), "type": ("type", "User")}


def timestamp(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def metadata(obj: User | Team | AccessKey | VirtualClusterInstance) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": obj.name, "uid": obj.uid, "resourceVersion": str(obj.resource_version),
                            "creationTimestamp": timestamp(obj.created)}
    if obj.labels:
        meta["labels"] = dict(obj.labels)
    if obj.annotations:
        meta["annotations"] = dict(obj.annotations)
    return meta


def user_object(user: User, teams: Iterable[str]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "User", "metadata": metadata(user),
            "spec": {"username": user.username, "displayName": user.display_name, "email": user.email,
                     "subject": user.subject, "groups": list(user.groups), "disabled": user.disabled,
                     "description": user.description},
            "status": {"teams": sorted(teams)}}


def team_object(team: Team) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Team", "metadata": metadata(team),
            "spec": {"displayName": team.display_name, "description": team.description, "users": list(team.members),
                     "groups": list(team.groups)},
            "status": {}}


def access_key_object(key: AccessKey) -> dict[str, Any]:
    spec: dict[str, Any] = {"displayName": key.display_name, "description": key.description, "type": key.type,
                            "disabled": key.disabled, "ttl": key.ttl, "ttlAfterLastActivity": key.ttl_after_last_activity}
    if key.user is not None:
        spec["user"] = key.user
    if key.team is not None:
        spec["team"] = key.team
    if key.scope is not None:
        spec["scope"] = key.scope
    status = {} if key.last_activity is None else {"lastActivity": int(key.last_activity)}
    return {"apiVersion": API_VERSION, "kind": "OwnedAccessKey", "metadata": metadata(key), "spec": spec,
            "status": status}


def instance_object(instance: VirtualClusterInstance, phase: str, message: str) -> dict[str, Any]:
    """A virtual cluster instance; its token never (status.hasToken says whether there is one)."""
    meta = {"namespace": instance.namespace, **metadata(instance)}
    status: dict[str, Any] = {"phase": phase, "hasToken": bool(instance.token)}
    if message:
        status["message"] = message
    return {"apiVersion": API_VERSION, "kind": "VirtualClusterInstance", "metadata": meta,
            "spec": {"displayName": instance.display_name, "description": instance.description,
                     "cluster": instance.cluster, "server": instance.server, "caData": instance.ca_data},
            "status": status}


def instance_changes(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The store fields a virtual cluster instance's create or update asks for; the token only when given."""
    changes = spec_changes(obj, INSTANCE_SPEC)
    token = (obj.get("spec") or {}).get("token")
    if token is not None:
        changes["token"] = token
    return changes


def object_key(obj: Mapping[str, Any]) -> str:
    """How an object is keyed among its resource's: NAMESPACE/NAME when namespaced, else its name."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def activity_object(activity: NamespaceActivity, version: int) -> dict[str, Any]:
    """A namespace's sleep-mode activity, named CLUSTER.NAMESPACE (a namespace name has no dot)."""
    info = {"subject": activity.subject, "verb": activity.verb, "apiGroup": activity.api_group,
            "resource": activity.resource, "subresource": activity.subresource, "name": activity.name,
            "virtualCluster": activity.virtual_cluster}
    return {"apiVersion": API_VERSION, "kind": "NamespaceActivity",
            "metadata": {"name": f"{activity.cluster}.{activity.namespace}", "resourceVersion": str(version),
                         "creationTimestamp": None},
            "spec": {"cluster": activity.cluster, "namespace": activity.namespace},
            "status": {"lastActivity": int(activity.last_activity),
                       "lastActivityInfo": {key: value for key, value in info.items() if value}}}


def teams_of(snapshot: Snapshot) -> dict[str, list[str]]:
    """User name -> the names of the teams it is a member of."""
    members: dict[str, list[str]] = {}
    for team in snapshot.teams.values():
        for user in team.members:
            members.setdefault(user, []).append(team.name)
    return members


def spec_changes(obj: Mapping[str, Any], fields: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """The store keyword arguments an object's spec and metadata ask for (absent: the default)."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    # A null is an absent field, as Kubernetes' decoders take it (kubectl sends some).
    changes = {store: default if spec.get(api) is None else spec[api] for api, (store, default) in fields.items()}
    for name, value in changes.items():
        if isinstance(value, list):
            changes[name] = tuple(value)
    changes["labels"] = meta.get("labels") or {}
    changes["annotations"] = meta.get("annotations") or {}
    return changes


def snapshot_events(old: Snapshot, new: Snapshot,
                    instance_status: Callable[[VirtualClusterInstance], tuple[str, str]]) -> list[Event]:
    """What changed between two snapshots, as watch events of users, teams, ownedaccesskeys,
    namespaceactivities and virtualclusterinstances (`instance_status`: phase and message on this gateway)."""
    version = new.version
    events: list[Event] = []
    # Snapshots are never changed in place: a mapping the new one shares with the old is unchanged.
    if old.users is not new.users:
        member_of = teams_of(new)
        events += _diff(old.users, new.users, version, "users", lambda user: user_object(user, member_of.get(user.name, ())))
    if old.teams is not new.teams:
        events += _diff(old.teams, new.teams, version, "teams", team_object)
    changes = new.key_changes
    if changes is not None and changes.base() is old:  # the store named the keys it changed: diff those alone
        events += _diff(_only(old.access_keys, changes.names), _only(new.access_keys, changes.names), version,
                        "ownedaccesskeys", access_key_object)
    elif old.access_keys is not new.access_keys:
        events += _diff(old.access_keys, new.access_keys, version, "ownedaccesskeys", access_key_object)
    if old.activities is not new.activities:
        events += _diff(old.activities, new.activities, version, "namespaceactivities",
                        lambda activity: activity_object(activity, new.activity_version))
    if old.virtual_cluster_instances is not new.virtual_cluster_instances:
        events += _diff(old.virtual_cluster_instances, new.virtual_cluster_instances, version, "virtualclusterinstances",
                        lambda instance: instance_object(instance, *instance_status(instance)))
    return events


def _only(objects: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {name: objects[name] for name in names if name in objects}


def _diff(old: Mapping[Any, Any], new: Mapping[Any, Any], version: int, resource: str, render: Any) -> list[Event]:
    events = []
    for name, obj in new.items():
        before = old.get(name)
        if before is None:
            events.append(Event(version, "ADDED", resource, render(obj)))
        elif before != obj and _changed(before, obj):
            events.append(Event(version, "MODIFIED", resource, render(obj)))
    for name, obj in old.items():
        if name not in new:
            deleted = render(obj)
            deleted["metadata"]["resourceVersion"] = str(version)
            events.append(Event(version, "DELETED", resource, deleted))
    return events


def _changed(before: Any, after: Any) -> bool:
    # An access key's last activity is written in batches and is not a change a watcher wants.
    if isinstance(after, AccessKey):
        return bool(before.resource_version != after.resource_version)
    return True
