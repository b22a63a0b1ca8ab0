"""The API surface the devcluster serves: resource types and the discovery documents that list them.

Discovery is answered in the legacy (unaggregated) format with `Content-Type: application/json`;
kubectl falls back to it when the aggregated `apidiscovery.k8s.io/v2` format is not returned.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

KUBERNETES_VERSION = (1, 32, 0)

STORED_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Subresource:
    name: str
    kind: str
    verbs: tuple[str, ...]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = STORED_VERBS
    subresources: tuple[Subresource, ...] = ()
    # Reviews are answered, never stored.
    stored: bool = True
    # `status` is owned by the cluster: a PUT or PATCH of the main resource keeps the current one.
    has_status: bool = False
    # Field selectors served beyond metadata.name and metadata.namespace.
    extra_fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    def subresource(self, name: str) -> Subresource | None:
        return next((sub for sub in self.subresources if sub.name == name), None)


_STREAM_VERBS = ("create", "get")

NAMESPACES = ResourceType("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",),
                          verbs=tuple(v for v in STORED_VERBS if v != "deletecollection"),
                          has_status=True, extra_fields=("status.phase",))
PODS = ResourceType(
    "", "v1", "pods", "pod", "Pod", True, ("po",), ("all",),
    subresources=(
        Subresource("log", "Pod", ("get",)),
        Subresource("exec", "PodExecOptions", _STREAM_VERBS),
        Subresource("attach", "PodAttachOptions", _STREAM_VERBS),
        Subresource("portforward", "PodPortForwardOptions", _STREAM_VERBS),
    ),
    has_status=True, extra_fields=("spec.nodeName", "status.phase"))
CONFIGMAPS = ResourceType("", "v1", "configmaps", "configmap", "ConfigMap", True, ("cm",))
SECRETS = ResourceType("", "v1", "secrets", "secret", "Secret", True, extra_fields=("type",))
SERVICES = ResourceType("", "v1", "services", "service", "Service", True, ("svc",), ("all",),
                        has_status=True)
DEPLOYMENTS = ResourceType("apps", "v1", "deployments", "deployment", "Deployment", True,
                           ("deploy",), ("all",), has_status=True)
SELF_SUBJECT_REVIEWS = ResourceType(
    "authentication.k8s.io", "v1", "selfsubjectreviews", "selfsubjectreview", "SelfSubjectReview",
    False, verbs=("create",), stored=False)
SELF_SUBJECT_ACCESS_REVIEWS = ResourceType(
    "authorization.k8s.io", "v1", "selfsubjectaccessreviews", "selfsubjectaccessreview",
    "SelfSubjectAccessReview", False, verbs=("create",), stored=False)
SUBJECT_ACCESS_REVIEWS = ResourceType(
    "authorization.k8s.io", "v1", "subjectaccessreviews", "subjectaccessreview",
    "SubjectAccessReview", False, verbs=("create",), stored=False)

RESOURCES: tuple[ResourceType, ...] = (
    NAMESPACES, PODS, CONFIGMAPS, SECRETS, SERVICES, DEPLOYMENTS,
    SELF_SUBJECT_REVIEWS, SELF_SUBJECT_ACCESS_REVIEWS, SUBJECT_ACCESS_REVIEWS,
)
STORED_RESOURCES = tuple(rt for rt in RESOURCES if rt.stored)

# Named groups in the order /apis lists them.
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(rt.group for rt in RESOURCES if rt.group))


def find_resource(group: str, version: str, plural: str) -> ResourceType | None:
    return next((rt for rt in RESOURCES
                 if (rt.group, rt.version, rt.plural) == (group, version, plural)), None)


def group_versions(group: str) -> list[str]:
    return list(dict.fromkeys(rt.version for rt in RESOURCES if rt.group == group))


def version_info() -> dict[str, Any]:
    major, minor, patch = KUBERNETES_VERSION
    return {
        "major": str(major),
        "minor": str(minor),
        "gitVersion": f"v{major}.{minor}.{patch}",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": group_versions(""),
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def api_group(group: str) -> dict[str, Any] | None:
    versions = group_versions(group)
    if not group or not versions:
        return None
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
            "preferredVersion": entries[0]}


def api_group_list() -> dict[str, Any]:
    groups = [api_group(group) for group in GROUPS]
    for doc in groups:
        del doc["kind"], doc["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_resource_list(group: str, version: str) -> dict[str, Any] | None:
    types = [rt for rt in RESOURCES if (rt.group, rt.version) == (group, version)]
    if not types:
        return None
    resources: list[dict[str, Any]] = []
    for rt in types:
        entry: dict[str, Any] = {
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        resources.append(entry)
        for sub in rt.subresources:
            resources.append({"name": f"{rt.plural}/{sub.name}", "singularName": "",
                              "namespaced": rt.namespaced, "kind": sub.kind,
                              "verbs": list(sub.verbs)})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": types[0].api_version, "resources": resources}


# OpenAPI v3: only what kubectl reads before create/apply. Listing `fieldValidation` on each
# PATCH operation tells kubectl the server validates fields itself, so it skips client-side schema
# validation (which would need the full /openapi/v2 schema this devcluster does not serve).

def openapi_v3_document(group: str, version: str) -> dict[str, Any] | None:
    types = [rt for rt in STORED_RESOURCES if (rt.group, rt.version) == (group, version)]
    if not types:
        return None
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    paths = {}
    for rt in types:
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        paths[f"{prefix}{scope}/{rt.plural}/{{name}}"] = {"patch": {
            "operationId": f"patch{rt.kind}",
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": rt.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        }}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v{}.{}.{}".format(*KUBERNETES_VERSION)},
            "paths": paths}


def openapi_v3_index() -> dict[str, Any]:
    paths = {}
    for group, version in dict.fromkeys((rt.group, rt.version) for rt in STORED_RESOURCES):
        path = f"apis/{group}/{version}" if group else f"api/{version}"
        digest = hashlib.sha256(json.dumps(openapi_v3_document(group, version), sort_keys=True).encode())
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest.hexdigest().upper()}"}
    return {"paths": paths}
