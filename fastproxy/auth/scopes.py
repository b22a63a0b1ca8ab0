"""Access key scopes: the AccessKeyScope model, parsed strictly, compiled once, checked per request.

A scope only narrows what a credential may do (the cluster's RBAC still decides); None means
unrestricted. A request is allowed when any one part of the scope allows it:

- `clusters`: every request to a listed cluster (`*`: any), including legacy virtual clusters
  served from it.
- `projects`: every space and virtual cluster request in a listed project (`*`: any), and
  management requests naming the project or inside its namespace (PREFIX + project).
- `spaces` / `virtualClusters`: requests to that space / virtual cluster of the project (`*`:
  any in it), and management requests for its spaceinstance / virtualclusterinstance.
- the `loft-cli` role (also `loftCLI`, or the deprecated `allowLoftCli`): the read-only
  management requests the CLI needs, listed in LOFT_CLI_REQUESTS, plus discovery. A role's
  `projects` narrows it to those project namespaces, its `virtualClusters` to those
  virtualclusterinstances. The other roles serve Loft's own components and grant nothing here.
- `rules` (deprecated): Kubernetes-style rules, where an empty list means "all".

`pods/exec`, `pods/attach` and `pods/portforward` are a GET (WebSocket) or a POST (SPDY),
depending on the client, so for them a rule's `get` and `create` verbs are interchangeable.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from .requestinfo import RequestInfo, RequestTarget

MANAGEMENT_GROUP = "management.loft.sh"
DEFAULT_PROJECT_NAMESPACE_PREFIX = "loft-p-"
ROLES = frozenset(("agent", "vcluster", "network-peer", "loft-cli", "loftCLI", "runner"))
_LOFT_CLI_ROLES = frozenset(("loft-cli", "loftCLI"))

_READ = frozenset(("get", "list", "watch"))
# (verbs, resource, subresource) in the management group; what `loft`/`vcluster` CLIs read to
# list and connect to what the key reaches. Secrets (e.g. clusters/X/accesskey) stay out.
LOFT_CLI_REQUESTS = (
    (frozenset(("create",)), "selves", ""),
    (frozenset(("create",)), "selfsubjectaccessreviews", ""),
    (_READ, "clusters", ""),
    (_READ, "projects", ""),
    (_READ, "projects", "clusters"),
    (_READ, "projects", "templates"),
    (_READ, "spaceinstances", ""),
    (_READ, "virtualclusterinstances", ""),
    (_READ, "virtualclustertemplates", ""),
)
_LOFT_CLI_LOOKUP = {(resource, sub): verbs for verbs, resource, sub in LOFT_CLI_REQUESTS}
_PROJECT_NAMESPACED = frozenset(("spaceinstances", "virtualclusterinstances"))
_DISCOVERY_PATHS = frozenset(("/version", "/api", "/apis"))
_CONNECT_SUBRESOURCES = frozenset(("exec", "attach", "portforward"))
_CONNECT_VERBS = frozenset(("get", "create"))
_MANAGEMENT, _CLUSTER, _VIRTUAL_CLUSTER, _PROJECT_SPACE, _PROJECT_VIRTUAL_CLUSTER = (
    target.value for target in RequestTarget)


class ScopeError(ValueError):
    """A scope that cannot be used; the message is one line naming the bad key."""


# ---- the model, with the JSON field names of AccessKeyScope ----

@dataclass(frozen=True, slots=True)
class ScopeRole:
    role: str = ""
    projects: tuple[str, ...] = ()
    virtual_clusters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScopeProject:
    project: str = ""


@dataclass(frozen=True, slots=True)
class ScopeSpace:
    project: str = ""
    space: str = ""


@dataclass(frozen=True, slots=True)
class ScopeVirtualCluster:
    project: str = ""
    virtual_cluster: str = ""


@dataclass(frozen=True, slots=True)
class ScopeCluster:
    cluster: str = ""


@dataclass(frozen=True, slots=True)
class GroupResources:
    group: str = ""
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleVirtualCluster:
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class ScopeRule:
    verbs: tuple[str, ...] = ()
    resources: tuple[GroupResources, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    request_targets: tuple[str, ...] = ()
    cluster: str = ""
    virtual_clusters: tuple[RuleVirtualCluster, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessKeyScope:
    roles: tuple[ScopeRole, ...] = ()
    projects: tuple[ScopeProject, ...] = ()
    spaces: tuple[ScopeSpace, ...] = ()
    virtual_clusters: tuple[ScopeVirtualCluster, ...] = ()
    clusters: tuple[ScopeCluster, ...] = ()
    rules: tuple[ScopeRule, ...] = ()
    allow_loft_cli: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, leaving out empty fields as the Loft API does."""
        return _to_dict(self)


# JSON key -> (attribute, kind); a kind is str, bool, (str,) for a list of strings, or (Class,).
_SCHEMA: dict[type, dict[str, tuple[str, Any]]] = {
    ScopeRole: {"role": ("role", str), "projects": ("projects", (str,)),
                "virtualClusters": ("virtual_clusters", (str,))},
    ScopeProject: {"project": ("project", str)},
    ScopeSpace: {"project": ("project", str), "space": ("space", str)},
    ScopeVirtualCluster: {"project": ("project", str), "virtualCluster": ("virtual_cluster", str)},
    ScopeCluster: {"cluster": ("cluster", str)},
    GroupResources: {"group": ("group", str), "resources": ("resources", (str,)),
                     "resourceNames": ("resource_names", (str,))},
    RuleVirtualCluster: {"name": ("name", str), "namespace": ("namespace", str)},
    ScopeRule: {"verbs": ("verbs", (str,)), "resources": ("resources", (GroupResources,)),
                "namespaces": ("namespaces", (str,)),
                "nonResourceURLs": ("non_resource_urls", (str,)),
                "requestTargets": ("request_targets", (str,)), "cluster": ("cluster", str),
                "virtualClusters": ("virtual_clusters", (RuleVirtualCluster,))},
    AccessKeyScope: {"roles": ("roles", (ScopeRole,)), "projects": ("projects", (ScopeProject,)),
                     "spaces": ("spaces", (ScopeSpace,)),
                     "virtualClusters": ("virtual_clusters", (ScopeVirtualCluster,)),
                     "clusters": ("clusters", (ScopeCluster,)), "rules": ("rules", (ScopeRule,)),
                     "allowLoftCli": ("allow_loft_cli", bool)},
}
_JSON_KEYS = {cls: {attr: key for key, (attr, _) in spec.items()} for cls, spec in _SCHEMA.items()}


def parse_scope(data: Mapping[str, Any] | str | bytes) -> AccessKeyScope:
    """Parse the JSON (or already decoded) form of an AccessKeyScope; raises ScopeError."""
    if isinstance(data, (str, bytes)):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise ScopeError(f"scope: not valid JSON: {error}") from None
    scope = _parse_object(AccessKeyScope, data, "")
    _validate(scope)
    return scope


def _parse_object(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ScopeError(f"scope: {where}: expected an object" if where else "scope: expected an object")
    spec = _SCHEMA[cls]
    values = {}
    for key, value in data.items():
        if key not in spec:
            raise ScopeError(f"scope: unknown key {_join(where, key)!r}")
        attr, kind = spec[key]
        if value is not None:
            values[attr] = _parse_value(kind, value, _join(where, key))
    return cls(**values)


def _parse_value(kind: Any, value: Any, where: str) -> Any:
    if kind is str or kind is bool:
        if type(value) is not kind:
            raise ScopeError(f"scope: {where}: expected a {'string' if kind is str else 'boolean'}")
        return value
    if not isinstance(value, list):
        raise ScopeError(f"scope: {where}: expected a list")
    (item_kind,) = kind
    if item_kind is str:
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ScopeError(f"scope: {where}[{index}]: expected a string")
        return tuple(value)
    return tuple(_parse_object(item_kind, item, f"{where}[{index}]") for index, item in enumerate(value))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _validate(scope: AccessKeyScope) -> None:
    """Refuse what the Loft API documents as invalid, and names that could never match."""
    for index, role in enumerate(scope.roles):
        if role.role not in ROLES:
            raise ScopeError(f"scope: roles[{index}].role: unknown role {role.role!r} "
                             f"(known: {', '.join(sorted(ROLES))})")
    for field_name, entries, keys in (
        ("projects", scope.projects, ("project",)),
        ("spaces", scope.spaces, ("project", "space")),
        ("virtualClusters", scope.virtual_clusters, ("project", "virtualCluster")),
        ("clusters", scope.clusters, ("cluster",)),
    ):
        for index, entry in enumerate(entries):
            for key in keys:
                value = getattr(entry, _SCHEMA[type(entry)][key][0])
                if not value:
                    raise ScopeError(f"scope: {field_name}[{index}].{key}: must not be empty")
                if value == "*" and key == "project" and field_name != "projects":
                    raise ScopeError(f"scope: {field_name}[{index}].project: '*' is not allowed here")
    for index, rule in enumerate(scope.rules):
        _validate_rule(rule, f"rules[{index}]")


def _validate_rule(rule: ScopeRule, where: str) -> None:
    if rule.resources and rule.non_resource_urls:
        raise ScopeError(f"scope: {where}: resources and nonResourceURLs cannot both be set")
    for index, target in enumerate(rule.request_targets):
        if target not in RequestTarget.__members__:
            raise ScopeError(f"scope: {where}.requestTargets[{index}]: unknown request target {target!r}")
    for index, url in enumerate(rule.non_resource_urls):
        if not url.startswith("/") or "*" in url[:-1]:
            raise ScopeError(f"scope: {where}.nonResourceURLs[{index}]: {url!r} must start with '/' "
                             "and may only end with '*'")
    for index, group in enumerate(rule.resources):
        if group.resource_names and not group.resources:
            raise ScopeError(f"scope: {where}.resources[{index}].resourceNames requires resources")
        for position, resource in enumerate(group.resources):
            pieces = resource.split("/")
            if (len(pieces) > 2 or not all(pieces) or pieces == ["*", "*"]
                    or any("*" in piece and piece != "*" for piece in pieces)):
                raise ScopeError(f"scope: {where}.resources[{index}].resources[{position}]: "
                                 f"{resource!r} is not RESOURCE, RESOURCE/SUBRESOURCE or a '*' form")


def _to_dict(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_dict(item) for item in value]
    if type(value) in _JSON_KEYS:
        keys = _JSON_KEYS[type(value)]
        out = {}
        for attribute in fields(value):
            item = getattr(value, attribute.name)
            if item:
                out[keys[attribute.name]] = _to_dict(item)
        return out
    return value


# ---- compiled form: sets and flags the per-request check walks without parsing ----

@dataclass(frozen=True, slots=True)
class _ResourceMatcher:
    group: str                     # "*": any group
    any_resource: bool             # "*" or an empty list
    exact: frozenset[str]          # "pods", "pods/log"
    all_subresources_of: frozenset[str]  # from "pods/*"
    subresource_of_any: frozenset[str]   # from "*/scale"
    names: frozenset[str] | None   # None: any name

    def matches(self, group: str, resource: str, subresource: str, name: str) -> bool:
        if self.group != group and self.group != "*":
            return False
        if not self.any_resource:
            if subresource:
                if not (resource + "/" + subresource in self.exact
                        or resource in self.all_subresources_of or subresource in self.subresource_of_any):
                    return False
            elif resource not in self.exact:
                return False
        return self.names is None or name in self.names


@dataclass(frozen=True, slots=True)
class _Rule:
    verbs: frozenset[str] | None          # None: any verb
    resources: tuple[_ResourceMatcher, ...] | None  # None: any resource
    namespaces: frozenset[str] | None     # None: any; "" is cluster-scoped
    urls: frozenset[str] | None           # None: any non-resource URL
    url_prefixes: tuple[str, ...]
    serves_resources: bool
    serves_non_resources: bool
    cluster: str                          # "": any
    virtual_clusters: tuple[tuple[str, str], ...]  # (name, namespace), "" = any

    def matches(self, info: RequestInfo, cluster: str, virtual_cluster: str, vcluster_namespace: str) -> bool:
        if self.cluster and self.cluster != cluster:
            return False
        if virtual_cluster and not self.covers_virtual_cluster(virtual_cluster, vcluster_namespace):
            return False
        verbs = self.verbs
        if info.is_resource_request:
            if not self.serves_resources:
                return False
            if verbs is not None and info.verb not in verbs and not (
                    info.verb in _CONNECT_VERBS and info.subresource in _CONNECT_SUBRESOURCES
                    and info.resource == "pods" and not info.api_group
                    and not verbs.isdisjoint(_CONNECT_VERBS)):
                return False
            if self.namespaces is not None and info.namespace not in self.namespaces:
                return False
            return self.resources is None or any(
                matcher.matches(info.api_group, info.resource, info.subresource, info.name)
                for matcher in self.resources)
        if not self.serves_non_resources or (verbs is not None and info.verb not in verbs):
            return False
        path = info.path
        return self.urls is None or path in self.urls or path.startswith(self.url_prefixes)

    def covers_virtual_cluster(self, virtual_cluster: str, vcluster_namespace: str) -> bool:
        return not self.virtual_clusters or any(
            (not name or name == virtual_cluster) and (not namespace or namespace == vcluster_namespace)
            for name, namespace in self.virtual_clusters)


@dataclass(frozen=True, slots=True)
class _CliGrant:
    namespaces: frozenset[str] | None       # project namespaces it is narrowed to; None: any
    projects: frozenset[str] | None
    virtual_clusters: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class CompiledScope:
    """A scope ready for check_scope; `source` is the parsed scope (for Self and audit)."""

    source: AccessKeyScope
    namespace_prefix: str = field(repr=False)
    all_clusters: bool = field(repr=False)
    clusters: frozenset[str] = field(repr=False)
    all_projects: bool = field(repr=False)
    projects: frozenset[str] = field(repr=False)
    spaces: Mapping[str, frozenset[str]] = field(repr=False)            # project -> spaces ("*": any)
    virtual_clusters: Mapping[str, frozenset[str]] = field(repr=False)  # project -> names ("*": any)
    loft_cli: tuple[_CliGrant, ...] = field(repr=False)
    rules: Mapping[str, tuple[_Rule, ...]] = field(repr=False)  # request target -> rules for it


def compile_scope(scope: AccessKeyScope, *,
                  project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> CompiledScope:
    clusters = frozenset(entry.cluster for entry in scope.clusters)
    projects = frozenset(entry.project for entry in scope.projects)
    spaces: dict[str, set[str]] = {}
    for entry in scope.spaces:
        spaces.setdefault(entry.project, set()).add(entry.space)
    virtual_clusters: dict[str, set[str]] = {}
    for entry in scope.virtual_clusters:
        virtual_clusters.setdefault(entry.project, set()).add(entry.virtual_cluster)
    cli = [_CliGrant(
        frozenset(project_namespace_prefix + project for project in role.projects) or None,
        frozenset(role.projects) or None, frozenset(role.virtual_clusters) or None)
        for role in scope.roles if role.role in _LOFT_CLI_ROLES]
    if scope.allow_loft_cli:
        cli.append(_CliGrant(None, None, None))
    compiled_rules = [(_compile_rule(rule), rule.request_targets) for rule in scope.rules]
    return CompiledScope(
        source=scope, namespace_prefix=project_namespace_prefix,
        all_clusters="*" in clusters, clusters=clusters,
        all_projects="*" in projects, projects=projects,
        spaces={project: frozenset(names) for project, names in spaces.items()},
        virtual_clusters={project: frozenset(names) for project, names in virtual_clusters.items()},
        loft_cli=tuple(cli),
        rules={target.value: tuple(rule for rule, targets in compiled_rules if not targets or target in targets)
               for target in RequestTarget})


def load_scope(data: Mapping[str, Any] | str | bytes, *,
               project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> CompiledScope:
    """parse_scope then compile_scope."""
    return compile_scope(parse_scope(data), project_namespace_prefix=project_namespace_prefix)


def _compile_rule(rule: ScopeRule) -> _Rule:
    verbs = frozenset(rule.verbs)
    urls = frozenset(url for url in rule.non_resource_urls if not url.endswith("*"))
    prefixes = tuple(url[:-1] for url in rule.non_resource_urls if url.endswith("*"))
    return _Rule(
        verbs=None if not verbs or "*" in verbs else verbs,
        resources=tuple(_compile_resources(group) for group in rule.resources) or None,
        namespaces=frozenset(rule.namespaces) or None,
        urls=None if not rule.non_resource_urls else urls,
        url_prefixes=prefixes,
        # Rules apply to resources or to non-resource URLs, or to both when they name neither.
        serves_resources=not rule.non_resource_urls,
        serves_non_resources=not rule.resources,
        cluster=rule.cluster,
        virtual_clusters=tuple((entry.name, entry.namespace) for entry in rule.virtual_clusters))


def _compile_resources(group: GroupResources) -> _ResourceMatcher:
    exact, all_subresources_of, subresource_of_any = set(), set(), set()
    any_resource = not group.resources
    for resource in group.resources:
        main, _, sub = resource.partition("/")
        if main == "*" and not sub:
            any_resource = True
        elif main == "*":
            subresource_of_any.add(sub)
        elif sub == "*":
            all_subresources_of.add(main)
        else:
            exact.add(resource)
    return _ResourceMatcher(group.group, any_resource, frozenset(exact), frozenset(all_subresources_of),
                            frozenset(subresource_of_any), frozenset(group.resource_names) or None)


# ---- the per-request check ----

def check_scope(scope: CompiledScope | None, info: RequestInfo, target: str, cluster: str = "", *,
                project: str = "", space: str = "", virtual_cluster: str = "",
                vcluster_namespace: str = "") -> str | None:
    """None when the scope allows the request, else a one-line message saying what it lacks.

    `cluster` is the connected cluster the request reaches ("" for management requests),
    `project`/`space`/`virtual_cluster` name the project target, and `vcluster_namespace` is the
    host namespace of a virtual cluster addressed by the legacy VirtualCluster target.
    """
    if scope is None:
        return None
    if target == _CLUSTER or target == _VIRTUAL_CLUSTER:
        if scope.all_clusters or cluster in scope.clusters:
            return None
    elif target == _PROJECT_SPACE:
        if scope.all_projects or project in scope.projects or _named(scope.spaces, project, space):
            return None
    elif target == _PROJECT_VIRTUAL_CLUSTER:
        if (scope.all_projects or project in scope.projects
                or _named(scope.virtual_clusters, project, virtual_cluster)):
            return None
    elif target == _MANAGEMENT:
        if _management_allows(scope, info):
            return None
    else:
        return f"unknown request target {target!r}"
    for rule in scope.rules.get(target, ()):
        if rule.matches(info, cluster, virtual_cluster, vcluster_namespace):
            return None
    return (f"access key scope does not allow {_describe(info)} "
            f"on {_describe_target(target, cluster, project, space, virtual_cluster, vcluster_namespace)}")


def _named(by_project: Mapping[str, frozenset[str]], project: str, name: str) -> bool:
    names = by_project.get(project)
    return names is not None and (name in names or "*" in names)


def _management_allows(scope: CompiledScope, info: RequestInfo) -> bool:
    if not info.is_resource_request:
        return bool(scope.loft_cli) and info.verb == "get" and (
            info.path in _DISCOVERY_PATHS or info.path.startswith(("/api/", "/apis/")))
    if info.api_group != MANAGEMENT_GROUP:
        return False
    resource, namespace, name = info.resource, info.namespace, info.name
    project = namespace[len(scope.namespace_prefix):] if namespace.startswith(scope.namespace_prefix) else ""
    if resource == "projects" and not namespace:
        if scope.all_projects or (name and name in scope.projects):
            return True
    elif project:
        if scope.all_projects or project in scope.projects:
            return True
        if resource == "spaceinstances" and _named(scope.spaces, project, name or "*"):
            return True
        if resource == "virtualclusterinstances" and _named(scope.virtual_clusters, project, name or "*"):
            return True
    if not scope.loft_cli:
        return False
    verbs = _LOFT_CLI_LOOKUP.get((resource, info.subresource))
    if verbs is None or info.verb not in verbs:
        return False
    for grant in scope.loft_cli:
        # Narrowed grants also refuse all-namespace lists, which would reach other projects.
        if (grant.namespaces is not None and resource in _PROJECT_NAMESPACED
                and namespace not in grant.namespaces):
            continue
        if grant.projects is not None and resource == "projects" and name not in grant.projects:
            continue
        if (grant.virtual_clusters is not None and resource == "virtualclusterinstances" and name
                and name not in grant.virtual_clusters):
            continue
        return True
    return False


def _describe(info: RequestInfo) -> str:
    if not info.is_resource_request:
        return f"{info.verb} {info.path}"
    resource = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    if info.api_group:
        resource = f"{resource}.{info.api_group}"
    text = f"{info.verb} {resource}"
    if info.name:
        text += f" {info.name!r}"
    if info.namespace:
        text += f" in namespace {info.namespace!r}"
    return text


def _describe_target(target: str, cluster: str, project: str, space: str,
                     virtual_cluster: str, vcluster_namespace: str) -> str:
    if target == _MANAGEMENT:
        return "the management API"
    if target == _CLUSTER:
        return f"cluster {cluster!r}"
    if target == _VIRTUAL_CLUSTER:
        return f"virtual cluster {vcluster_namespace}/{virtual_cluster} on cluster {cluster!r}"
    if target == _PROJECT_SPACE:
        return f"space {space!r} of project {project!r}"
    return f"virtual cluster {virtual_cluster!r} of project {project!r}"


def reaches_cluster(scope: CompiledScope, cluster: str) -> bool:
    """Whether the scope allows anything at all on `cluster` (then kubectl may discover it)."""
    return (scope.all_clusters or cluster in scope.clusters
            or any(not rule.cluster or rule.cluster == cluster for rule in scope.rules.get(_CLUSTER, ())))


def reaches_virtual_cluster(scope: CompiledScope, cluster: str, name: str, namespace: str) -> bool:
    """Whether the scope allows anything at all on the virtual cluster `name` in `namespace` of `cluster`."""
    return (scope.all_clusters or cluster in scope.clusters
            or any((not rule.cluster or rule.cluster == cluster) and rule.covers_virtual_cluster(name, namespace)
                   for rule in scope.rules.get(_VIRTUAL_CLUSTER, ())))


def covers(limit: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the scope `wanted` grants nothing that `limit` does not (both in their JSON form).

    Deliberately literal, so it can only err by refusing: every grant of `wanted` must be one of
    `limit`'s own (a `{"cluster": "*"}` in `limit` covers any cluster), and the loft-cli
    permission only passes on to a scope whose limit has it.
    """
    for key, grants in wanted.items():
        if key == "allowLoftCli":
            if grants and not limit.get("allowLoftCli"):
                return False
            continue
        held = limit.get(key) or []
        if key == "clusters" and {"cluster": "*"} in held:
            continue
        if any(grant not in held for grant in grants):
            return False
    return True
