"""Who is asking (bearer token or client certificate), whom they may impersonate, and what they
may do (a small rule-based authoriser with the API server's request attributes and messages)."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .errors import ApiError, bad_request

GATEWAY_USER = "fastproxy-gateway"
ADMIN_USER = "admin"
AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    uid: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def user_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"username": self.user, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = {key: list(values) for key, values in self.extra.items()}
        return info


def authenticated(user: str, groups: Iterable[str] = (), uid: str = "",
                  extra: Mapping[str, tuple[str, ...]] | None = None) -> Identity:
    """An identity with `system:authenticated` added, as every authenticator does."""
    groups = tuple(dict.fromkeys([*groups, AUTHENTICATED]))
    return Identity(user, groups, uid, dict(extra or {}))


class Authenticator:
    def __init__(self, tokens: Mapping[str, Identity]):
        self._tokens = dict(tokens)

    def authenticate(self, authorization: str | None, peer_cert: dict | None) -> Identity:
        """Resolve a bearer token, else a verified TLS client certificate (CN user, O groups)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            identity = self._tokens.get(token.strip())
            if identity is None:
                raise ApiError(401, "Unauthorized")
            return identity
        if peer_cert:
            subject = [attr for rdn in peer_cert.get("subject", ()) for attr in rdn]
            names = [value for key, value in subject if key == "commonName"]
            if names:
                return authenticated(names[0], [value for key, value in subject
                                                if key == "organizationName"])
        raise ApiError(401, "Unauthorized")


def read_token_file(path: Path) -> dict[str, Identity]:
    """Static tokens in the API server's `--token-auth-file` CSV form: token,user,uid,"g1,g2"."""
    tokens = {}
    with open(path, newline="") as lines:
        for row in csv.reader(lines):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0] or not row[1]:
                raise ValueError(f"{path}: a line needs at least a token and a user name: {row!r}")
            groups = [g.strip() for g in row[3].split(",") if g.strip()] if len(row) > 3 else []
            tokens[row[0]] = authenticated(row[1], groups, row[2] if len(row) > 2 else "")
    return tokens


# Request attributes

@dataclass(frozen=True)
class Attributes:
    """What a request does, in the API server's authorisation terms."""
    verb: str
    path: str = ""
    is_resource: bool = False
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def resource_path(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


_METHOD_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update",
                 "PATCH": "patch", "DELETE": "delete"}
_NAMESPACE_SUBRESOURCES = ("status", "finalize")


def is_true_flag(value: str | None) -> bool:
    """Boolean query parameters as the API server reads them: present and not 0/false."""
    return value is not None and value.lower() not in ("0", "false")


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> Attributes:
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if len(parts) < 2 or parts[0] not in ("api", "apis") or (parts[0] == "apis" and len(parts) < 3):
        return Attributes(verb=method.lower(), path=path)
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return Attributes(verb=method.lower(), path=path)
    verb = _METHOD_VERBS.get(method.upper(), method.lower())
    if rest[0] == "watch":
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name:
        if verb == "get":
            verb = "watch" if is_true_flag(query.get("watch")) else "list"
        elif verb == "delete":
            verb = "deletecollection"
    if not name and verb in ("list", "watch"):
        name = _name_from_field_selector(query.get("fieldSelector", ""))
    return Attributes(verb=verb, path=path, is_resource=True, api_group=group, api_version=version,
                      resource=resource, subresource=subresource, namespace=namespace, name=name)


def _name_from_field_selector(selector: str) -> str:
    """A list or watch pinned to one name is authorised as that name, as the API server does."""
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    names = [t.split("=")[-1] for t in terms
             if t.startswith(("metadata.name=", "metadata.name=="))]
    return names[0] if len(terms) == 1 and names else ""


# Authorisation rules

_RULE_KEYS = {"users", "groups", "verbs", "resources", "namespaces", "apiGroups", "nonResourceURLs"}


@dataclass(frozen=True)
class Rule:
    """Grants `verbs` to `users`/`groups` on `resources` (optionally in `namespaces`, within
    `apiGroups`; both unrestricted when absent) or on non-resource URL paths."""
    verbs: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    namespaces: tuple[str, ...] | None = None
    api_groups: tuple[str, ...] = ("*",)
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, raw: Any) -> Rule:
        if not isinstance(raw, dict):
            raise ValueError(f"a rule must be a JSON object, not {raw!r}")
        if unknown := set(raw) - _RULE_KEYS:
            raise ValueError(f"unknown rule fields {sorted(unknown)} in {raw!r}")
        for key, value in raw.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"rule field {key!r} must be a list of strings in {raw!r}")
        if not raw.get("verbs"):
            raise ValueError(f"a rule needs verbs: {raw!r}")
        if not raw.get("users") and not raw.get("groups"):
            raise ValueError(f"a rule needs users or groups: {raw!r}")
        if bool(raw.get("resources")) == bool(raw.get("nonResourceURLs")):
            raise ValueError(f"a rule needs either resources or nonResourceURLs: {raw!r}")
        return cls(verbs=tuple(raw["verbs"]), users=tuple(raw.get("users", ())),
                   groups=tuple(raw.get("groups", ())), resources=tuple(raw.get("resources", ())),
                   namespaces=tuple(raw["namespaces"]) if "namespaces" in raw else None,
                   api_groups=tuple(raw.get("apiGroups", ("*",))),
                   non_resource_urls=tuple(raw.get("nonResourceURLs", ())))

    def applies_to(self, identity: Identity) -> bool:
        return ("*" in self.users or identity.user in self.users
                or "*" in self.groups or any(g in self.groups for g in identity.groups))

    def allows(self, attrs: Attributes) -> bool:
        if "*" not in self.verbs and attrs.verb not in self.verbs:
            return False
        if not attrs.is_resource:
            return any(_path_matches(pattern, attrs.path) for pattern in self.non_resource_urls)
        if "*" not in self.api_groups and attrs.api_group not in self.api_groups:
            return False
        if self.namespaces is not None and "*" not in self.namespaces \
                and (not attrs.namespace or attrs.namespace not in self.namespaces):
            return False
        return any(_resource_matches(pattern, attrs) for pattern in self.resources)


def _path_matches(pattern: str, path: str) -> bool:
    return pattern == "*" or pattern == path or (pattern.endswith("*") and path.startswith(pattern[:-1]))


def _resource_matches(pattern: str, attrs: Attributes) -> bool:
    if pattern in ("*", attrs.resource_path):
        return True
    resource, _, subresource = pattern.partition("/")
    if not subresource or not attrs.subresource:
        return False
    return (resource == attrs.resource and subresource == "*") \
        or (resource == "*" and subresource == attrs.subresource)


_DISCOVERY_PATHS = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi",
                    "/openapi/*", "/healthz", "/livez", "/readyz")

# The cluster's bootstrap policy, always in force; a rules file adds to it.
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(verbs=("*",), groups=(MASTERS,), resources=("*",)),
    Rule(verbs=("*",), groups=(MASTERS,), non_resource_urls=("*",)),
    Rule(verbs=("impersonate",), users=(GATEWAY_USER,), resources=("users", "groups"),
         api_groups=("",)),
    Rule(verbs=("impersonate",), users=(GATEWAY_USER,), resources=("uids", "userextras/*"),
         api_groups=("authentication.k8s.io",)),
    Rule(verbs=("create",), users=(GATEWAY_USER,), resources=("subjectaccessreviews",),
         api_groups=("authorization.k8s.io",)),
    Rule(verbs=("*",), users=(GATEWAY_USER,), resources=("services/proxy",), api_groups=("",)),
    Rule(verbs=("get",), groups=(AUTHENTICATED,), non_resource_urls=_DISCOVERY_PATHS),
    Rule(verbs=("create",), groups=(AUTHENTICATED,),
         resources=("selfsubjectreviews", "selfsubjectaccessreviews"),
         api_groups=("authentication.k8s.io", "authorization.k8s.io")),
)


def load_rules(path: Path) -> list[Rule]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read rules file {path}: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"rules file {path} must hold a JSON list of rules")
    return [Rule.from_json(rule) for rule in raw]


class Authorizer:
    def __init__(self, extra_rules: Iterable[Rule] = ()):
        self.rules = (*BUILTIN_RULES, *extra_rules)

    def allows(self, identity: Identity, attrs: Attributes) -> bool:
        return any(rule.applies_to(identity) and rule.allows(attrs) for rule in self.rules)

    def check(self, identity: Identity, attrs: Attributes) -> None:
        if not self.allows(identity, attrs):
            raise forbidden(identity, attrs)


def forbidden(identity: Identity, attrs: Attributes) -> ApiError:
    if not attrs.is_resource:
        return ApiError(403, f'forbidden: User "{identity.user}" cannot {attrs.verb} path "{attrs.path}"')
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    subject = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    message = (f'{subject} is forbidden: User "{identity.user}" cannot {attrs.verb} resource '
               f'"{attrs.resource_path}" in API group "{attrs.api_group}" {scope}')
    return ApiError(403, message, name=attrs.name or None, group=attrs.api_group, kind=attrs.resource)


# Impersonation

def impersonate(headers: Any, identity: Identity, authorizer: Authorizer) -> Identity:
    """Apply `Impersonate-*` headers (an aiohttp/multidict header mapping), checking that the
    authenticated identity may impersonate each requested user, group, uid and extra value."""
    user = headers.get("Impersonate-User")
    groups = headers.getall("Impersonate-Group", [])
    uid = headers.get("Impersonate-Uid")
    extra: dict[str, tuple[str, ...]] = {}
    for header, value in headers.items():
        if header.lower().startswith("impersonate-extra-"):
            key = unquote(header[len("impersonate-extra-"):].lower())
            extra[key] = (*extra.get(key, ()), value)
    if user is None:
        if groups or uid is not None or extra:
            raise bad_request("requested impersonation of groups, uid or extra without impersonating a user")
        return identity
    checks = [("users", "", user), *(("groups", "", group) for group in groups)]
    if uid is not None:
        checks.append(("uids", "authentication.k8s.io", uid))
    for key, values in extra.items():
        checks.extend((f"userextras/{key}", "authentication.k8s.io", value) for value in values)
    for resource_path, group, name in checks:
        resource, _, subresource = resource_path.partition("/")
        attrs = Attributes(verb="impersonate", is_resource=True, api_group=group, resource=resource,
                           subresource=subresource, name=name)
        authorizer.check(identity, attrs)
    return authenticated(user, groups, uid or "", extra)
