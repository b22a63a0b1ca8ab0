"""The management API's resources (management.loft.sh/v1) as data, and every document derived from them.

One table, `RESOURCES`, defines each resource: its names, verbs, the schema of its spec and status
(small `Node` trees) and its table columns. Discovery (plain and aggregated), the OpenAPI v3
document, Tables for kubectl and request validation are all generated from it, so a field exists in
exactly one place. Paths are as an API server sees them (`/apis/management.loft.sh/v1/users`); the
gateway serves them under /kubernetes/management/. Pure data and pure functions: no I/O.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from ..kube.patch import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from ..names import DNS_SUBDOMAIN

GROUP = "management.loft.sh"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
GROUP_PATH = f"/apis/{API_VERSION}"
# The Kubernetes release whose API conventions these documents follow: what /version reports, so that
# clients checking the server's version (kubectl version's skew warning, charts' kubeVersion) see one.
KUBERNETES_MINOR = 31
MAX_DEPTH = 32        # deeper than any management object: a deeper body is an attack, not a mistake
MAX_NODES = 10_000    # values in one object, far above a real one (a user with thousands of groups)

_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
_LOFT = "com.github.loft-sh.api.v4.pkg.apis."
_MANAGEMENT = _LOFT + "management.v1."
_STORAGE = _LOFT + "storage.v1."


# --- schema nodes --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Node:
    """One schema node: what the OpenAPI document publishes and what validation checks.

    `type` is a JSON Schema type, or "map" (string keys, `values` typed) or "free" (any JSON
    object, unchecked). A node with a `name` is published once under components.schemas and
    referenced; `ref` is a use of such a node under a field description of its own.
    """
    type: str
    description: str = ""
    properties: Mapping[str, Node] = field(default_factory=dict)
    items: Node | None = None
    values: Node | None = None
    enum: tuple[str, ...] = ()
    format: str = ""
    name: str = ""
    ref: Node | None = None

    @property
    def target(self) -> Node:
        return self.ref or self


def string(description: str, *, enum: tuple[str, ...] = (), format: str = "") -> Node:
    return Node("string", description, enum=enum, format=format)


def boolean(description: str) -> Node:
    return Node("boolean", description)


def integer(description: str) -> Node:
    return Node("integer", description, format="int64")


def number(description: str) -> Node:
    return Node("number", description, format="double")


def array(description: str, items: Node) -> Node:
    return Node("array", description, items=items)


def strings(description: str) -> Node:
    return array(description, Node("string"))


def obj(description: str, properties: Mapping[str, Node], *, name: str = "") -> Node:
    return Node("object", description, properties=properties, name=name)


def use(named: Node, description: str) -> Node:
    """A field whose value is the named schema `named`, described for this field."""
    return Node(named.type, description, ref=named)


# --- Kubernetes metadata ---------------------------------------------------------------------------

TIME = Node("string", "A point in time, serialized as an RFC 3339 string (2006-01-02T15:04:05Z).", format="date-time",
            name=_META + "Time")
FIELDS_V1 = Node("free", "The set of fields a manager owns, in the structured-merge-diff field set format.",
                 name=_META + "FieldsV1")
PATCH = Node("free", "The body of a PATCH request: a JSON patch, a merge patch or a strategic merge patch.",
             name=_META + "Patch")
OWNER_REFERENCE = obj("An object this object depends on: it is deleted when all its owners are.", {
    "apiVersion": string("API version of the owner."),
    "blockOwnerDeletion": boolean("If true, the owner cannot be deleted from the key-value store before this object is."),
    "controller": boolean("If true, this owner is the managing controller."),
    "kind": string("Kind of the owner."),
    "name": string("Name of the owner."),
    "uid": string("UID of the owner."),
}, name=_META + "OwnerReference")
MANAGED_FIELDS_ENTRY = obj("Which fields a workflow (field manager) manages, at which API version.", {
    "apiVersion": string("The version of the resource the field set applies to."),
    "fieldsType": string("The format of fieldsV1; the only one is \"FieldsV1\"."),
    "fieldsV1": use(FIELDS_V1, "The field set, in the FieldsV1 format."),
    "manager": string("The workflow managing these fields."),
    "operation": string("The operation that made this entry: Apply or Update."),
    "subresource": string("The subresource the entry was written through, empty for the main resource."),
    "time": use(TIME, "When these fields were last changed."),
}, name=_META + "ManagedFieldsEntry")
OBJECT_META = obj("Metadata every persisted object has.", {
    "annotations": Node("map", "Unstructured key-value data tools store with the object; not queryable.",
                        values=Node("string")),
    "creationTimestamp": use(TIME, "When the object was created; set by the server, read-only."),
    "deletionGracePeriodSeconds": integer("Seconds allowed for graceful termination once deletion was requested; read-only."),
    "deletionTimestamp": use(TIME, "When the object will be deleted; set by the server when deletion is requested."),
    "finalizers": strings("Entries that must be removed before the object is deleted from the store."),
    "generateName": string("A prefix from which the server generates a unique name when name is not given."),
    "generation": integer("A sequence number of changes to the desired state; set by the server."),
    "labels": Node("map", "Key-value pairs to organize and select objects (label selectors).", values=Node("string")),
    "managedFields": array("Which field managers own which fields; maintained by the server.", MANAGED_FIELDS_ENTRY),
    "name": string("The object's name, unique for its kind: a lowercase RFC 1123 subdomain. Cannot be updated."),
    "namespace": string("The namespace of a namespaced object (virtualclusterinstances: the host namespace); "
                        "cluster-scoped objects have none."),
    "ownerReferences": array("Objects this object depends on.", OWNER_REFERENCE),
    "resourceVersion": string("An opaque version of the object, for optimistic concurrency and watches; set by the server."),
    "selfLink": string("Deprecated and never set."),
    "uid": string("Unique in time and space for this object; set by the server on creation, read-only."),
}, name=_META + "ObjectMeta")
LIST_META = obj("Metadata of a list.", {
    "continue": string("The token that fetches the next page, when the list was limited and more items remain."),
    "remainingItemCount": integer("How many items follow this page."),
    "resourceVersion": string("The version of the state the list was read at; watch from it to see later changes."),
    "selfLink": string("Deprecated and never set."),
}, name=_META + "ListMeta")

# --- access key scopes (as in loft-sh/api storage/v1) -----------------------------------------------

SCOPE = obj("What an access key may reach: a key with a scope can only do what the scope allows.", {
    "roles": array("Predefined roles: agent, vcluster, network-peer, loft-cli, runner.", obj(
        "A predefined role, optionally limited to projects and virtual clusters.", {
            "role": string("The name of the role."),
            "projects": strings("The projects the role is limited to."),
            "virtualClusters": strings("The virtual clusters the role is limited to."),
        }, name=_STORAGE + "AccessKeyScopeRole")),
    "projects": array("Projects the key may access, with everything in them.", obj("A project the key may access.", {
        "project": string("The project's name; * for all projects."),
    }, name=_STORAGE + "AccessKeyScopeProject")),
    "spaces": array("Spaces the key may access.", obj("A space of a project the key may access.", {
        "project": string("The project the space belongs to."),
        "space": string("The space's name; * for all spaces of the project."),
    }, name=_STORAGE + "AccessKeyScopeSpace")),
    "virtualClusters": array("Virtual clusters the key may access.", obj("A virtual cluster of a project the key may access.", {
        "project": string("The project the virtual cluster belongs to."),
        "virtualCluster": string("The virtual cluster's name; * for all virtual clusters of the project."),
    }, name=_STORAGE + "AccessKeyScopeVirtualCluster")),
    "clusters": array("Clusters the key may access through the gateway.", obj("A cluster the key may access.", {
        "cluster": string("The cluster's name; * for all clusters."),
    }, name=_STORAGE + "AccessKeyScopeCluster")),
    "rules": array("Deprecated: use the other fields. Kubernetes-style rules; an empty list means all.", obj(
        "Deprecated: a Kubernetes-style rule of what the key may do.", {
            "verbs": strings("The verbs the rule allows; empty means all."),
            "resources": array("The resources the rule covers; empty means all.", obj(
                "Resources of one API group.", {
                    "group": string("The API group; empty is the core group."),
                    "resources": strings("Resource names, optionally with a subresource (pods/log)."),
                    "resourceNames": strings("Object names; empty means all."),
                }, name=_STORAGE + "GroupResources")),
            "namespaces": strings("The namespaces the rule covers; empty means all."),
            "nonResourceURLs": strings("Non-resource URL paths the rule allows; a trailing * matches a prefix."),
            "requestTargets": strings("Where requests go: Management, Cluster, VCluster and the like."),
            "cluster": string("The cluster the rule applies to; empty means all."),
            "virtualClusters": array("The virtual clusters the rule applies to.", obj("A virtual cluster by name and namespace.", {
                "name": string("The virtual cluster's name."),
                "namespace": string("The namespace it runs in."),
            }, name=_STORAGE + "AccessKeyVirtualCluster")),
        }, name=_STORAGE + "AccessKeyScopeRule")),
    "allowLoftCli": boolean("Deprecated: use roles with loft-cli. Allows what the loft CLI needs."),
}, name=_STORAGE + "AccessKeyScope")

# --- the resources' specs and statuses -------------------------------------------------------------

_DISPLAY_NAME = "The name shown in user interfaces."
_DESCRIPTION = "A free-form description."

USER_SPEC = obj("UserSpec holds what defines a user.", {
    "displayName": string(_DISPLAY_NAME),
    "description": string(_DESCRIPTION),
    "username": string("The name the user logs in with; defaults to the object's name."),
    "email": string("The user's email address."),
    "subject": string("The subject the user is known as to clusters (the impersonated user name)."),
    "groups": strings("Groups the user belongs to, besides those of its teams."),
    "disabled": boolean("If true, the user's access keys and tokens are refused."),
    "password": string("Write-only, never returned: a new password for /auth/password/login, kept as an argon2id "
                       "hash; \"\" removes it, absent leaves it as it is."),
}, name=_MANAGEMENT + "UserSpec")
USER_STATUS = obj("UserStatus holds what the gateway reports about a user.", {
    "teams": strings("The teams the user is a member of."),
}, name=_MANAGEMENT + "UserStatus")
TEAM_SPEC = obj("TeamSpec holds what defines a team.", {
    "displayName": string(_DISPLAY_NAME),
    "description": string(_DESCRIPTION),
    "users": strings("The users who are members of the team."),
    "groups": strings("Groups every member of the team belongs to."),
}, name=_MANAGEMENT + "TeamSpec")
TEAM_STATUS = obj("TeamStatus holds what the gateway reports about a team.", {}, name=_MANAGEMENT + "TeamStatus")
KEY_TYPES = ("", "Login", "User", "Other")
ACCESS_KEY_SPEC = obj("OwnedAccessKeySpec holds what defines an access key.", {
    "displayName": string(_DISPLAY_NAME),
    "description": string(_DESCRIPTION),
    "user": string("The user the key belongs to."),
    "team": string("The team the key belongs to, for a key of a team rather than of a user."),
    "subject": string("The subject the key authenticates as, when it is not its user's."),
    "groups": strings("Extra groups the key authenticates with."),
    "key": string("The secret bearer token. Write-only: shown once, in the response that creates the key."),
    "disabled": boolean("If true, the key is kept but refused."),
    "ttl": integer("Seconds the key is valid for, from its creation (or last activity, see ttlAfterLastActivity); "
                   "0 means no expiry."),
    "ttlAfterLastActivity": boolean("If true, ttl counts from the key's last use instead of its creation."),
    "scope": use(SCOPE, "Limits what the key may access; absent means everything its owner may."),
    "type": string("What the key is for: Login (created by logging in), User (created by its user) or Other.", enum=KEY_TYPES),
}, name=_MANAGEMENT + "OwnedAccessKeySpec")
ACCESS_KEY_STATUS = obj("OwnedAccessKeyStatus holds what the gateway reports about an access key.", {
    "lastActivity": integer("When the key was last used, in Unix seconds."),
}, name=_MANAGEMENT + "OwnedAccessKeyStatus")
SELF_SPEC = obj("SelfSpec holds what a client asks about itself.", {
    "accessKey": string("An access key to describe instead of the one the request presents."),
}, name=_MANAGEMENT + "SelfSpec")
SELF_STATUS = obj("SelfStatus describes who the caller is.", {
    "user": use(obj("UserInfo identifies a user.", {
        "name": string("The user's object name."),
        "username": string("The user's login name."),
        "displayName": string(_DISPLAY_NAME),
        "email": string("The user's email address."),
        "subject": string("The subject the user is known as to clusters."),
    }, name=_MANAGEMENT + "UserInfo"), "The user the caller is, if it is one."),
    "teams": array("The teams the caller is a member of.", obj("EntityInfo names an object.", {
        "name": string("The object's name."),
        "displayName": string(_DISPLAY_NAME),
    }, name=_MANAGEMENT + "EntityInfo")),
    "accessKey": string("The name of the access key the caller presented."),
    "accessKeyScope": use(SCOPE, "The scope of that access key."),
    "accessKeyType": string("The type of that access key.", enum=KEY_TYPES),
    "subject": string("The subject the caller authenticates as."),
    "uid": string("The UID of the caller's user."),
    "groups": strings("The groups the caller authenticates with."),
    "instanceID": string("Identifies this gateway installation."),
    "projectNamespacePrefix": string("The prefix of the namespaces of projects."),
}, name=_MANAGEMENT + "SelfStatus")
TOKEN_SPEC = obj("DirectClusterEndpointTokenSpec holds what a client asks of a token.", {
    "ttl": integer("Seconds the token is valid for; 0 means the gateway's default."),
    "scope": use(SCOPE, "Limits what the token may access, within what the caller may."),
}, name=_MANAGEMENT + "DirectClusterEndpointTokenSpec")
TOKEN_STATUS = obj("DirectClusterEndpointTokenStatus holds the issued token.", {
    "token": string("A bearer token for the clusters' direct endpoints (edge gateways)."),
}, name=_MANAGEMENT + "DirectClusterEndpointTokenStatus")
CLUSTER_PHASES = ("Ready", "Unreachable", "Unknown")
CLUSTER_SPEC = obj("ClusterSpec holds what defines a cluster; clusters are configured in the gateway's configuration.", {
    "displayName": string(_DISPLAY_NAME),
    "server": string("The URL of the cluster's API server."),
}, name=_MANAGEMENT + "ClusterSpec")
CLUSTER_STATUS = obj("ClusterStatus holds what the gateway's probe last saw of a cluster.", {
    "phase": string("Whether the cluster answers: Ready, Unreachable or Unknown (not probed yet).", enum=CLUSTER_PHASES),
    "kubernetesVersion": string("The cluster's Kubernetes version (gitVersion)."),
    "latencySeconds": number("How long the last probe took, in seconds."),
    "lastProbeTime": string("When the cluster was last probed (RFC 3339).", format="date-time"),
    "message": string("Why the cluster is not Ready."),
}, name=_MANAGEMENT + "ClusterStatus")
ACTIVITY_SPEC = obj("NamespaceActivitySpec names the namespace.", {
    "cluster": string("The cluster the namespace is in."),
    "namespace": string("The namespace."),
}, name=_MANAGEMENT + "NamespaceActivitySpec")
ACTIVITY_INFO = obj("NamespaceActivityInfo describes the request that was a namespace's last activity.", {
    "subject": string("Who made it."),
    "verb": string("Its verb."),
    "apiGroup": string("The API group of its resource."),
    "resource": string("Its resource."),
    "subresource": string("Its subresource."),
    "name": string("The object it named."),
    "virtualCluster": string("The virtual cluster it reached, if any."),
}, name=_MANAGEMENT + "NamespaceActivityInfo")
ACTIVITY_STATUS = obj("NamespaceActivityStatus holds the namespace's last sleep-mode activity.", {
    "lastActivity": integer("When a request last reached the namespace (Unix seconds)."),
    "lastActivityInfo": use(ACTIVITY_INFO, "What that request was."),
}, name=_MANAGEMENT + "NamespaceActivityStatus")

INSTANCE_PHASES = ("Ready", "Shadowed", "Failed")
INSTANCE_SPEC = obj("VirtualClusterInstanceSpec says where a virtual cluster runs and how the gateway reaches it; "
                    "its namespace is the host namespace, its name the virtual cluster's.", {
    "displayName": string(_DISPLAY_NAME),
    "description": string(_DESCRIPTION),
    "cluster": string("The host cluster (a cluster of the gateway's configuration) the virtual cluster runs in."),
    "server": string("The https URL of the virtual cluster's own API server; empty: the host cluster's service "
                     "proxy to the service named after the virtual cluster in the host namespace, with the host's "
                     "credential."),
    "caData": string("With server: base64 PEM of the CA bundle that signs its certificate; empty: the system's CAs."),
    "token": string("With server: the bearer token the gateway authenticates with (it must be allowed to "
                    "impersonate). Write-only, never returned; absent in an update leaves it as it is, \"\" removes it."),
}, name=_MANAGEMENT + "VirtualClusterInstanceSpec")
INSTANCE_STATUS = obj("VirtualClusterInstanceStatus says whether this gateway serves the virtual cluster.", {
    "phase": string("Ready: served under /kubernetes/virtualcluster/CLUSTER/NAMESPACE/NAME/; Shadowed: the gateway's "
                    "configuration defines one of the same name, which is served instead; Failed: the host cluster "
                    "is not one of the gateway's.", enum=INSTANCE_PHASES),
    "message": string("Why the phase is not Ready."),
    "hasToken": boolean("Whether a token is stored (it is never returned)."),
}, name=_MANAGEMENT + "VirtualClusterInstanceStatus")


# --- table columns ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Column:
    """A Table column: its definition, and the cell of an object at a moment (Unix seconds)."""
    name: str
    type: str
    description: str
    cell: Callable[[Mapping[str, Any], float], Any]
    format: str = ""

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "format": self.format, "description": self.description,
                "priority": 0}


def _field(title: str, part: str, name: str, description: str, kind: str = "string") -> Column:
    """A column showing one field of spec or status; absent and empty values show as <none>."""
    def cell(obj: Mapping[str, Any], now: float) -> Any:
        value = (obj.get(part) or {}).get(name)
        return None if value in (None, "") else value
    return Column(title, kind, description, cell)


def _joined(title: str, part: str, name: str, description: str) -> Column:
    """A column showing a string list, comma-separated as kubectl prints lists."""
    def cell(obj: Mapping[str, Any], now: float) -> Any:
        return ",".join((obj.get(part) or {}).get(name) or ()) or None
    return Column(title, "string", description, cell)


NAME_COLUMN = Column("Name", "string", "The object's name (metadata.name).",
                     lambda obj, now: (obj.get("metadata") or {}).get("name"), format="name")
AGE_COLUMN = Column("Age", "date", "How long ago the object was created (metadata.creationTimestamp).",
                    lambda obj, now: age((obj.get("metadata") or {}).get("creationTimestamp"), now))


def _last_activity(obj: Mapping[str, Any], now: float) -> str | None:
    moment = (obj.get("status") or {}).get("lastActivity")
    return None if moment is None else human_duration(now - moment)


def _activity_info(title: str, name: str, description: str) -> Column:
    def cell(obj: Mapping[str, Any], now: float) -> Any:
        return ((obj.get("status") or {}).get("lastActivityInfo") or {}).get(name) or None
    return Column(title, "string", description, cell)


def _latency(obj: Mapping[str, Any], now: float) -> str | None:
    seconds = (obj.get("status") or {}).get("latencySeconds")
    return None if seconds is None else f"{round(seconds * 1000)}ms"


# --- resources -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Resource:
    """One resource of management.loft.sh/v1: cluster-scoped, or `namespaced` (listed across namespaces too)."""
    plural: str
    singular: str
    kind: str
    description: str
    verbs: tuple[str, ...]
    spec: Node
    status: Node
    columns: tuple[Column, ...] = (NAME_COLUMN, AGE_COLUMN)
    short_names: tuple[str, ...] = ()
    namespaced: bool = False

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


STORED_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
RESOURCES = (
    Resource("users", "user", "User", "A user of the gateway: who its access keys authenticate as.", STORED_VERBS,
             USER_SPEC, USER_STATUS,
             (NAME_COLUMN, _field("Username", "spec", "username", "The user's login name."),
              _field("Display Name", "spec", "displayName", _DISPLAY_NAME),
              _field("Email", "spec", "email", "The user's email address."),
              _field("Disabled", "spec", "disabled", "Whether the user is disabled.", "boolean"), AGE_COLUMN)),
    Resource("teams", "team", "Team", "A team: users who share groups and access.", STORED_VERBS, TEAM_SPEC, TEAM_STATUS,
             (NAME_COLUMN, _field("Display Name", "spec", "displayName", _DISPLAY_NAME),
              _joined("Users", "spec", "users", "The team's members."), AGE_COLUMN)),
    Resource("ownedaccesskeys", "ownedaccesskey", "OwnedAccessKey", "An access key of a user or team: a bearer token for the gateway.",
             STORED_VERBS, ACCESS_KEY_SPEC, ACCESS_KEY_STATUS,
             (NAME_COLUMN, _field("Type", "spec", "type", "What the key is for."),
              _field("User", "spec", "user", "The user the key belongs to."),
              _field("Team", "spec", "team", "The team the key belongs to."),
              _field("Display Name", "spec", "displayName", _DISPLAY_NAME),
              _field("Disabled", "spec", "disabled", "Whether the key is disabled.", "boolean"), AGE_COLUMN)),
    Resource("selves", "self", "Self", "Who the caller is: create one to learn it (the loft CLI does so at login).", ("create",),
             SELF_SPEC, SELF_STATUS),
    Resource("directclusterendpointtokens", "directclusterendpointtoken", "DirectClusterEndpointToken",
             "A token for the clusters' direct endpoints: create one to receive it.", ("create",), TOKEN_SPEC, TOKEN_STATUS),
    Resource("clusters", "cluster", "Cluster", "A cluster the gateway proxies to, with what its probe last saw.",
             ("get", "list", "watch"), CLUSTER_SPEC, CLUSTER_STATUS,
             (NAME_COLUMN, _field("Phase", "status", "phase", "Whether the cluster answers."),
              _field("Version", "status", "kubernetesVersion", "The cluster's Kubernetes version."),
              Column("Latency", "string", "How long the last probe took.", _latency), AGE_COLUMN)),
    Resource("namespaceactivities", "namespaceactivity", "NamespaceActivity",
             "Sleep-mode activity: the last request that reached a namespace of a cluster (named CLUSTER.NAMESPACE).",
             ("get", "list", "watch"), ACTIVITY_SPEC, ACTIVITY_STATUS,
             (NAME_COLUMN, _field("Cluster", "spec", "cluster", "The cluster."),
              _field("Namespace", "spec", "namespace", "The namespace."),
              Column("Last Activity", "string", "How long ago a request last reached it.", _last_activity),
              _activity_info("Subject", "subject", "Who made that request."),
              _activity_info("Verb", "verb", "Its verb."))),
    Resource("virtualclusterinstances", "virtualclusterinstance", "VirtualClusterInstance",
             "A virtual cluster served under /kubernetes/virtualcluster/, in its host namespace; created by admins.",
             STORED_VERBS, INSTANCE_SPEC, INSTANCE_STATUS,
             (NAME_COLUMN, _field("Cluster", "spec", "cluster", "The host cluster."),
              Column("Server", "string", "The virtual cluster's own API server, or the host's service proxy.",
                     lambda obj, now: (obj.get("spec") or {}).get("server") or "<host service proxy>"),
              _field("Phase", "status", "phase", "Whether this gateway serves it."), AGE_COLUMN),
             short_names=("vci",), namespaced=True),
)
_BY_PLURAL = {resource.plural: resource for resource in RESOURCES}


def resource(plural: str) -> Resource | None:
    return _BY_PLURAL.get(plural)


@functools.cache
def object_schema(resource: Resource) -> Node:
    """The schema of a whole object of the resource: type fields, metadata, spec and status."""
    return obj(resource.description, {
        "apiVersion": string("The versioned schema of this object: management.loft.sh/v1."),
        "kind": string(f"The kind of this object: {resource.kind}."),
        "metadata": use(OBJECT_META, "Standard object metadata."),
        "spec": use(resource.spec, f"The {resource.kind}'s specification."),
        "status": use(resource.status, f"What the gateway reports about the {resource.kind}; ignored in requests."),
    }, name=_MANAGEMENT + resource.kind)


@functools.cache
def list_schema(resource: Resource) -> Node:
    return obj(f"A list of {resource.kind} objects.", {
        "apiVersion": string("The versioned schema of this list: management.loft.sh/v1."),
        "items": array(f"The {resource.plural}.", object_schema(resource)),
        "kind": string(f"The kind of this list: {resource.list_kind}."),
        "metadata": use(LIST_META, "Standard list metadata."),
    }, name=_MANAGEMENT + resource.list_kind)


# --- /version and discovery ------------------------------------------------------------------------

@functools.cache
def _version_info() -> dict[str, str]:
    """Read once: the package metadata is on disk."""
    try:
        gateway = importlib.metadata.version("fastproxy")
    except importlib.metadata.PackageNotFoundError:
        gateway = "0.0.0"
    build = re.sub(r"[^0-9A-Za-z.-]", "-", gateway)
    return {"major": "1", "minor": str(KUBERNETES_MINOR), "gitVersion": f"v1.{KUBERNETES_MINOR}.0+fastproxy.{build}",
            "gitCommit": "", "gitTreeState": "", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "",
            "compiler": sys.implementation.name, "platform": f"{sys.platform}/{_go_arch(platform.machine())}"}


def version_info() -> dict[str, str]:
    """/version: the Kubernetes level followed, with the gateway's own version as semver build metadata."""
    return dict(_version_info())


def _go_arch(machine: str) -> str:
    """The machine name as Go spells it, which is what clients expect in `platform`."""
    machine = machine.lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386"}.get(machine, machine)


def api_versions() -> dict[str, Any]:
    """/api: the management API serves no core (legacy) group."""
    return {"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []}


def _group_version() -> dict[str, str]:
    return {"groupVersion": API_VERSION, "version": VERSION}


def _group() -> dict[str, Any]:
    return {"name": GROUP, "versions": [_group_version()], "preferredVersion": _group_version()}


def api_group() -> dict[str, Any]:
    """/apis/management.loft.sh"""
    return {"kind": "APIGroup", "apiVersion": "v1", **_group()}


def api_group_list() -> dict[str, Any]:
    """/apis, unaggregated."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group()]}


def api_resource_list() -> dict[str, Any]:
    """/apis/management.loft.sh/v1"""
    resources = []
    for entry in RESOURCES:
        item: dict[str, Any] = {"name": entry.plural, "singularName": entry.singular, "namespaced": entry.namespaced,
                                "kind": entry.kind, "verbs": list(entry.verbs)}
        if entry.short_names:
            item["shortNames"] = list(entry.short_names)
        resources.append(item)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": resources}


def aggregated_discovery(form: str = "v2", *, legacy: bool = False) -> dict[str, Any]:
    """/apis as one APIGroupDiscoveryList, in the apidiscovery.k8s.io version `form` (v2 or v2beta1: same body).

    `legacy`: the same for /api, which has no groups here. Clients use the resources of an aggregated
    /apis only when /api is aggregated too; otherwise they fetch every group version on top.
    """
    if legacy:
        return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{form}", "metadata": {}, "items": []}
    resources = []
    for entry in RESOURCES:
        item: dict[str, Any] = {"resource": entry.plural,
                                "responseKind": {"group": GROUP, "version": VERSION, "kind": entry.kind},
                                "scope": "Namespaced" if entry.namespaced else "Cluster",
                                "singularResource": entry.singular, "verbs": list(entry.verbs)}
        if entry.short_names:
            item["shortNames"] = list(entry.short_names)
        resources.append(item)
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{form}", "metadata": {},
            "items": [{"metadata": {"name": GROUP},
                       "versions": [{"version": VERSION, "resources": resources, "freshness": "Current"}]}]}


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    """(media type, parameters, q) of each acceptable range of an Accept header, in the header's order."""
    ranges = []
    for part in accept.split(","):
        media, *params = part.split(";")
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(values.pop("q", "1"))
        except ValueError:
            quality = 0.0
        if quality > 0:
            ranges.append((media.strip().lower(), values, quality))
    return ranges


def discovery_form(accept: str) -> str | None:
    """Which aggregated discovery form (v2, v2beta1) an Accept header prefers; None: the plain documents."""
    best: tuple[float, str] | None = None
    for media, params, quality in _media_ranges(accept):
        if (media == "application/json" and params.get("g") == "apidiscovery.k8s.io"
                and params.get("as") == "APIGroupDiscoveryList" and params.get("v") in ("v2", "v2beta1")
                and (best is None or quality > best[0])):
            best = (quality, params["v"])
    return best[1] if best is not None else None


def table_asked(accept: str) -> bool:
    """Whether the client asks for a meta.k8s.io Table (kubectl get does, for server-side printing)."""
    return any(media == "application/json" and params.get("as") == "Table" and params.get("g") == "meta.k8s.io"
               and params.get("v") in ("v1", "v1beta1") for media, params, _ in _media_ranges(accept))


# --- OpenAPI v3 ------------------------------------------------------------------------------------

_PARAMETERS = {
    "pretty": ("string", "If 'true', the output is pretty printed."),
    "dryRun": ("string", "When present, the change is checked but not persisted. The only valid value is All."),
    "fieldManager": ("string", "A name for the actor making the change, for field management."),
    "fieldValidation": ("string", "What to do with unknown or duplicate fields in the body: Ignore, Warn or Strict "
                                  "(fail the request)."),
    "labelSelector": ("string", "Only objects whose labels match this selector."),
    "fieldSelector": ("string", "Only objects whose fields match this selector (metadata.name)."),
    "limit": ("integer", "At most this many items; a continue token in the list metadata fetches the rest."),
    "continue": ("string", "The continue token of the previous page."),
    "watch": ("boolean", "Stream changes (added, modified, deleted) instead of returning a list."),
    "resourceVersion": ("string", "For a watch, the version to start from."),
    "allowWatchBookmarks": ("boolean", "Allow BOOKMARK events in a watch, which carry only a resourceVersion."),
    "timeoutSeconds": ("integer", "End the list or watch after this many seconds."),
}
_WRITE = ("dryRun", "fieldManager", "fieldValidation", "pretty")
_LIST = ("continue", "fieldSelector", "labelSelector", "limit", "pretty", "resourceVersion", "timeoutSeconds")
_WATCH = ("allowWatchBookmarks", "watch")


def _ref(node: Node) -> dict[str, str]:
    return {"$ref": "#/components/schemas/" + node.name}


def _openapi(node: Node, components: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema of a field, publishing the named schemas it uses into `components`."""
    target = node.target
    if not target.name:
        return _inline(node, components)
    if target.name not in components:
        components[target.name] = {}  # taken before recursing: a schema is published once
        components[target.name] = _inline(target, components)
    schema: dict[str, Any] = {"allOf": [_ref(target)]}
    if node.ref is not None:
        schema["description"] = node.description
    if target.type == "object":
        schema["default"] = {}
    return schema


def _inline(node: Node, components: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object" if node.type in ("map", "free") else node.type}
    if node.description:
        schema["description"] = node.description
    if node.format:
        schema["format"] = node.format
    if node.enum:
        schema["enum"] = list(node.enum)
    if node.items is not None:
        schema["items"] = _openapi(node.items, components)
    if node.values is not None:
        schema["additionalProperties"] = _openapi(node.values, components)
    if node.type == "object":
        schema["properties"] = {key: _openapi(child, components) for key, child in node.properties.items()}
    return schema


def _gvk(kind: str) -> dict[str, str]:
    return {"group": GROUP, "kind": kind, "version": VERSION}


def _parameter(name: str, where: str = "query") -> dict[str, Any]:
    if where == "path":
        return {"name": name, "in": "path", "required": True, "description": f"The {name} of the object" + (
                    "." if name == "name" else " (for virtualclusterinstances: the host namespace)."),
                "schema": {"type": "string"}}
    kind, description = _PARAMETERS[name]
    return {"name": name, "in": "query", "description": description, "schema": {"type": kind}}


_CODES = {"200": "OK", "201": "Created", "202": "Accepted"}


def _response(schema: Node, *codes: str) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref(schema)}}
    return {**{code: {"description": _CODES[code], "content": content} for code in codes}, "401": {"description": "Unauthorized"}}


def _operation(resource: Resource, action: str, verb: str, parameters: tuple[str, ...], responses: dict[str, Any],
               body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One operation; every one names its kind (x-kubernetes-group-version-kind), which kubectl uses to
    find the resource's schema (explain) and whether PATCH takes fieldValidation (server-side validation)."""
    kind = resource.list_kind if action == "list" else resource.kind
    operation: dict[str, Any] = {
        "tags": ["managementLoftSh_v1"], "description": f"{verb} {resource.kind}",
        "operationId": f"{verb}ManagementLoftShV1{kind}",
        "parameters": [_parameter(name) for name in parameters], "responses": responses,
        "x-kubernetes-action": action, "x-kubernetes-group-version-kind": _gvk(resource.kind)}
    if body is not None:
        operation["requestBody"] = {"content": body, "required": True}
    return operation


def _paths(resource: Resource) -> dict[str, Any]:
    kind, verbs = object_schema(resource), resource.verbs
    collection: dict[str, Any] = {}
    item: dict[str, Any] = {}
    if "list" in verbs:
        listed = _LIST + _WATCH if "watch" in verbs else _LIST
        collection["get"] = _operation(resource, "list", "list", listed, _response(list_schema(resource), "200"))
    if "create" in verbs:
        collection["post"] = _operation(resource, "post", "create", _WRITE, _response(kind, "200", "201", "202"),
                                        {"*/*": {"schema": _ref(kind)}})
    if "get" in verbs:
        item["get"] = _operation(resource, "get", "read", ("pretty",), _response(kind, "200"))
    if "update" in verbs:
        item["put"] = _operation(resource, "put", "replace", _WRITE, _response(kind, "200", "201"),
                                 {"*/*": {"schema": _ref(kind)}})
    if "patch" in verbs:
        item["patch"] = _operation(resource, "patch", "patch", _WRITE, _response(kind, "200", "201"),
                                   {media: {"schema": _ref(PATCH)} for media in (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)})
    if "delete" in verbs:
        item["delete"] = _operation(resource, "delete", "delete", ("dryRun", "pretty"),
                                    _response(kind, "200", "202"))
    if not resource.namespaced:
        paths = {f"{GROUP_PATH}/{resource.plural}": collection} if collection else {}
        if item:
            paths[f"{GROUP_PATH}/{resource.plural}/{{name}}"] = {**item, "parameters": [_parameter("name", "path")]}
        return paths
    # Namespaced: everything below namespaces/{namespace}, and the list (and watch) across namespaces.
    namespace = [_parameter("namespace", "path")]
    paths = {f"{GROUP_PATH}/namespaces/{{namespace}}/{resource.plural}": {**collection, "parameters": namespace},
             f"{GROUP_PATH}/namespaces/{{namespace}}/{resource.plural}/{{name}}": {
                 **item, "parameters": [_parameter("name", "path"), *namespace]}}
    if "get" in collection:
        listed = collection["get"]
        paths[f"{GROUP_PATH}/{resource.plural}"] = {"get": {**listed, "operationId": listed["operationId"].replace(
            "ManagementLoftShV1", "ManagementLoftShV1ForAllNamespaces", 1)}}
    return paths


def _openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for entry in RESOURCES:
        paths.update(_paths(entry))
        kinds = [(object_schema(entry), entry.kind)] + ([(list_schema(entry), entry.list_kind)] if "list" in entry.verbs else [])
        for node, kind in kinds:
            _openapi(node, components)
            components[node.name]["x-kubernetes-group-version-kind"] = [_gvk(kind)]
    _openapi(PATCH, components)
    return {"openapi": "3.0.0", "info": {"title": "fastproxy management API", "version": VERSION}, "paths": paths,
            "components": {"schemas": dict(sorted(components.items()))}}


@functools.cache
def openapi_v3_group() -> bytes:
    """/openapi/v3/apis/management.loft.sh/v1, serialized once: it never changes at runtime."""
    return orjson.dumps(_openapi_document())


@functools.cache
def _openapi_hash() -> str:
    return hashlib.sha512(openapi_v3_group()).hexdigest().upper()


def openapi_v3_index(prefix: str = "") -> dict[str, Any]:
    """/openapi/v3. Leave `prefix` (the external path, /kubernetes/management) out, as API servers do:
    Go clients (kubectl 1.27 and later) put the path of their --server before a serverRelativeURL that
    starts with /openapi/v3, so the bare URL works directly and through `kubectl proxy
    --append-server-path`; one carrying the prefix is requested as is, which breaks behind that proxy."""
    url = f"{prefix}/openapi/v3{GROUP_PATH}?hash={_openapi_hash()}"
    return {"paths": {GROUP_PATH.lstrip("/"): {"serverRelativeURL": url}}}


# Clients ask for the first spelling; responses use the second, a media type Go's parser accepts ("@" is not).
_OPENAPI_V2_ASKED = frozenset(("application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
                               "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"))
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def openapi_v2(accept: str) -> tuple[bytes, str]:
    """/openapi/v2 (body, content type): a Swagger 2.0 document with no paths and no definitions.

    kubectl downloads it before using OpenAPI v3 in two places: `explain` up to 1.27, and the
    client-side validation `create`/`apply` fall back to for kinds without a PATCH operation (selves,
    directclusterendpointtokens), where the v3 document cannot say that the server validates. Empty,
    it defers both to v3 and to the server. kubectl asks for gnostic protobuf and decodes the body as
    that whatever the content type, so that form is encoded here by hand: four fields.
    """
    if any(media in _OPENAPI_V2_ASKED for media, _, _ in _media_ranges(accept)):
        info = _proto(1, b"fastproxy management API") + _proto(2, VERSION.encode())
        return _proto(1, b"2.0") + _proto(2, info) + _proto(8, b"") + _proto(9, b""), OPENAPI_V2_PROTOBUF
    document = {"swagger": "2.0", "info": {"title": "fastproxy management API", "version": VERSION}, "paths": {},
                "definitions": {}}
    return orjson.dumps(document), "application/json"


def _proto(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings and messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# --- Tables ----------------------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """A duration as kubectl prints ages: two significant units at most (5s, 3m20s, 2d4h, 3y)."""
    whole = int(seconds)  # truncated toward zero, as Go converts
    if whole < -1:
        return "<invalid>"
    whole = max(whole, 0)  # up to a second ahead is clock skew: "0s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if whole < 120:
        return f"{whole}s"
    if minutes < 10:
        return _units(minutes, "m", whole % 60, "s")
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return _units(hours, "h", minutes % 60, "m")
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return _units(days, "d", hours % 24, "h")
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return _units(days // 365, "y", days % 365, "d")
    return f"{days // 365}y"


def _units(major: int, major_unit: str, minor: int, minor_unit: str) -> str:
    return f"{major}{major_unit}{minor}{minor_unit}" if minor else f"{major}{major_unit}"


def age(timestamp: str | None, now: float) -> str:
    """The Age cell of an RFC 3339 creation timestamp at `now` (Unix seconds)."""
    if not timestamp:
        return "<unknown>"
    try:
        created = datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return "<unknown>"
    return human_duration(now - created)


def table(resource: Resource, objects: list[dict[str, Any]], *, include_object: str = "Metadata",
          list_meta: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table of the objects; each row carries the object per includeObject
    (None, Metadata: a PartialObjectMetadata, Object: the whole object)."""
    if include_object not in ("None", "Metadata", "Object"):
        raise ValueError(f"includeObject must be None, Metadata or Object, not {include_object!r}")
    moment = time.time() if now is None else now
    rows = []
    for item in objects:
        row: dict[str, Any] = {"cells": [column.cell(item, moment) for column in resource.columns]}
        if include_object == "Object":
            row["object"] = item
        elif include_object == "Metadata":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": item.get("metadata") or {}}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": dict(list_meta),
            "columnDefinitions": [column.definition() for column in resource.columns], "rows": rows}


# --- validation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cause:
    """A Kubernetes StatusCause. `unknown` marks an unknown field: a strict decoding error (400),
    which a client may also ask to ignore or be warned of, where other causes make the object Invalid (422)."""
    type: str
    field: str
    message: str
    unknown: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.type, "message": self.message, "field": self.field}


class _TooLarge(Exception):
    """Validation stops: the object exceeds the bounds, and one cause says so."""

    def __init__(self, cause: Cause):
        super().__init__(cause.message)
        self.cause = cause


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
    "map": lambda value: isinstance(value, dict),
    "free": lambda value: isinstance(value, dict),
}
_SCHEMA_TYPE = {"map": "object", "free": "object"}


def _type_name(value: Any) -> str:
    """The JSON type of a value, as the API server names it in messages (never the value: it may be huge)."""
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Checker:
    def __init__(self) -> None:
        self.causes: list[Cause] = []
        self.nodes = 0

    def count(self, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooLarge(Cause("FieldValueTooMany", path, f"Too many: the object has more than {MAX_NODES} values"))
        if depth > MAX_DEPTH:
            raise _TooLarge(Cause("FieldValueInvalid", path, f"Invalid value: the object is nested more than {MAX_DEPTH} deep"))

    def check(self, node: Node, value: Any, path: str, depth: int) -> None:
        self.count(path, depth)
        node = node.target
        if value is None:  # null is an absent field, as Go clients and servers decode it
            return
        if not _JSON_TYPES[node.type](value):
            expected = _SCHEMA_TYPE.get(node.type, node.type)
            self.causes.append(Cause("FieldValueTypeInvalid", path,
                                     f'Invalid value: "{_type_name(value)}": must be of type {expected}'))
        elif node.enum and value not in node.enum:
            supported = ", ".join(f'"{option}"' for option in node.enum)
            self.causes.append(Cause("FieldValueNotSupported", path, f"Unsupported value: {_quoted(value)}: "
                                                                     f"supported values: {supported}"))
        elif node.type == "object":
            self.fields(node, value, path, depth)
        elif node.type == "array" and node.items is not None:
            for index, item in enumerate(value):
                self.check(node.items, item, f"{path}[{index}]", depth + 1)
        elif node.type == "map" and node.values is not None:
            for key, item in value.items():
                self.check(node.values, item, f"{path}[{key}]", depth + 1)
        elif node.type == "free":
            self.free(value, path, depth)

    def fields(self, node: Node, value: dict[Any, Any], path: str, depth: int) -> None:
        for key, item in value.items():
            child = node.properties.get(key) if isinstance(key, str) else None
            where = _join(path, key)
            if child is None:
                self.count(where, depth + 1)  # unknown fields are not walked, but their number is bounded too
                self.causes.append(Cause("FieldValueInvalid", where, f'unknown field "{where}"', unknown=True))
            else:
                self.check(child, item, where, depth + 1)

    def free(self, value: Any, path: str, depth: int) -> None:
        """Free-form JSON is not typed, but it counts against the bounds like the rest."""
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            self.count(path, depth + 1)
            self.free(child, path, depth + 1)


def _quoted(value: Any) -> str:
    return orjson.dumps(value).decode() if isinstance(value, str) else str(value)


def validate(resource: Resource, obj: dict[str, Any], *, for_create: bool) -> list[Cause]:
    """The causes that make `obj` no valid object of `resource` in a create (`for_create`) or an update
    body: type fields, unknown fields anywhere, types, enums, the name's form, a resourceVersion on
    create. `status` is ignored: the server sets it, and clients send what they read (Self create
    bodies carry one). Whether a name is required is the caller's: selves and tokens have none."""
    checker = _Checker()
    schema = object_schema(resource)
    body = {key: value for key, value in obj.items() if key != "status"}
    try:
        checker.fields(schema, body, "", 0)
    except _TooLarge as bound:
        return [bound.cause]
    return _type_causes(resource, obj) + _meta_causes(obj, for_create) + checker.causes


def _type_causes(resource: Resource, obj: Mapping[str, Any]) -> list[Cause]:
    causes = []
    for name, expected in (("apiVersion", API_VERSION), ("kind", resource.kind)):
        value = obj.get(name)
        if value in (None, ""):
            causes.append(Cause("FieldValueRequired", name, "Required value"))
        elif isinstance(value, str) and value != expected:  # not a string: a type cause already
            causes.append(Cause("FieldValueInvalid", name, f"Invalid value: {_quoted(value)}: must be {expected}"))
    return causes


def _meta_causes(obj: Mapping[str, Any], for_create: bool) -> list[Cause]:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name, version = meta.get("name"), meta.get("resourceVersion")
    causes = []
    if isinstance(name, str) and name and not DNS_SUBDOMAIN.match(name):
        causes.append(Cause("FieldValueInvalid", "metadata.name",
                            f"Invalid value: {_quoted(name)}: a lowercase RFC 1123 subdomain must consist of lower case "
                            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"))
    if for_create and isinstance(version, str) and version:
        causes.append(Cause("FieldValueInvalid", "metadata.resourceVersion",
                            f"Invalid value: {_quoted(version)}: must be empty when creating an object"))
    return causes
