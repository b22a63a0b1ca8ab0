"""The audit log: one `audit.k8s.io/v1` Event per request stage, as JSON lines, chosen by a policy.

The policy is the API server's own format (`audit.k8s.io/v1` `Policy`, YAML or JSON): the first
rule whose selectors all match a request gives its level (None, Metadata, Request,
RequestResponse), and a request no rule matches is not logged. Besides the API server's selectors
(`users`, `userGroups`, `verbs`, `resources`, `namespaces`, `nonResourceURLs`) a rule may select
the gateway's `requestTargets` (Management, Cluster, VirtualCluster…) and `clusters` (names, or
`*` for any). Without a policy file every request is logged at Metadata.

The observer is batched (context.BatchObserver): the connection only appends each request to a
list at its start and finish, and every FLUSH_INTERVAL (0.1 s) the observer makes the events of
the requests begun and finished since, stamped with the times the request context recorded, and
queues them as one write. The level is decided once, at the request's start, against the
authenticated identity (the handlers resolve it before observers are told). Stages:
- RequestReceived at the start;
- ResponseStarted for long-running requests only (watch and proxy verbs; exec, attach,
  portforward, proxy and log subresources; upgrades), as the API server: emitted by `tick()`
  (the gateway's once-a-second tick, after the batches) once the response has begun, with the
  time of the upstream's first byte when it is known; a request that ends before then gets
  it at its finish when its first byte's time is known, just before its last stage;
- ResponseComplete at the finish, or Panic in its place for a 500 the gateway raised itself
  (a handler's uncaught exception: status 500 with the message `INTERNAL_ERROR`).

The event's `requestURI` is the path and query below the route prefix as the cluster (or the
management API) receives them, normalised; for routes with no API server behind them (health,
/auth/, /oidc/, refusals before routing) the whole path, without its query (OAuth codes and
state travel there). `sourceIPs` are as the API server lists them
(X-Forwarded-For, X-Real-Ip, then the peer, the one address a client cannot make up);
`impersonatedUser` is what the client's Impersonate-* headers asked for, allowed or not.
Annotations name the request target, the cluster and the access key (`identity.source`, never
a secret); no header is ever written, so neither is `Authorization`.

A request's own fields are encoded once (orjson), at its first event; each stage's fields (stage,
responseStatus, objects, stageTimestamp) are spliced after them as bytes. The lines go to a
`BackgroundWriter`: its thread writes them; when it cannot keep up they are dropped and counted
(`dropped`), never waited for.
Request and response objects (levels Request and RequestResponse) only exist for handlers that
give them with `record_bodies` (the management API: the observer never sees bodies), at most
`max_object_bytes` each, with secrets redacted.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any
from urllib.parse import unquote

import orjson
import yaml

from ..auth.identity import Identity
from ..auth.requestinfo import RequestInfo, RequestTarget
from ..config import ConfigError, _Table
from ..context import ID_AT, RequestContext, RequestIds
from ..management.body import decode_object
from ..names import DNS_SUBDOMAIN
from ..routing import CLUSTER, MANAGEMENT, VIRTUAL_CLUSTER
from ..status import REASONS, StatusError
from .rotating import BackgroundWriter, LogFile, Sink, log_file_fields, open_sink

log = logging.getLogger("fastproxy.observe")

# --- levels and stages --------------------------------------------------------------------------

LEVELS = ("None", "Metadata", "Request", "RequestResponse")
NONE, METADATA, REQUEST, REQUEST_RESPONSE = range(4)
STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
INTERNAL_ERROR = "internal error"  # the message of a 500 for a handler's uncaught exception (local.py)
REDACTED = "[REDACTED]"
POLICY_VERSIONS = ("audit.k8s.io/v1", "audit.k8s.io/v1beta1")

# Route kinds -> request targets (the other kinds are no API server and have none).
REQUEST_TARGETS = {CLUSTER: RequestTarget.Cluster.value, VIRTUAL_CLUSTER: RequestTarget.VirtualCluster.value,
                   MANAGEMENT: RequestTarget.Management.value}
# The API server's long-running requests (BasicLongRunningRequestCheck): these get ResponseStarted.
LONG_RUNNING_VERBS = frozenset(("watch", "proxy"))
LONG_RUNNING_SUBRESOURCES = frozenset(("attach", "exec", "proxy", "log", "portforward"))


class PolicyError(ValueError):
    """A policy the gateway refuses; the message is one line naming the rule and field."""


# --- the policy ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupResources:
    group: str = ""
    resources: tuple[str, ...] = ()          # empty: every resource of the group
    resource_names: frozenset[str] = frozenset()  # empty: any name

    def matches(self, resource: str, subresource: str, name: str) -> bool:
        if not self.resources:
            return True
        if self.resource_names and name not in self.resource_names:
            return False
        combined = f"{resource}/{subresource}" if subresource else resource
        for wanted in self.resources:
            if wanted == combined or wanted == "*":
                return True
            if subresource and wanted.startswith("*/") and wanted[2:] == subresource:
                return True
            if wanted.endswith("/*") and wanted[:-2] == resource:
                return True
        return False


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule; a selector that is None matches everything (an empty list in the file)."""

    level: int
    users: frozenset[str] | None = None
    user_groups: frozenset[str] | None = None
    verbs: frozenset[str] | None = None
    resources: tuple[GroupResources, ...] | None = None
    namespaces: frozenset[str] | None = None
    non_resource_urls: tuple[str, ...] | None = None
    omit_stages: frozenset[str] = frozenset()   # the rule's and the policy's
    request_targets: frozenset[str] | None = None
    clusters: frozenset[str] | None = None
    omit_managed_fields: bool = False            # the rule's, else the policy's

    def matches(self, user: str | None, groups: tuple[str, ...], info: RequestInfo, target: str | None,
                cluster: str) -> bool:
        if self.users is not None and (user is None or user not in self.users):
            return False
        if self.user_groups is not None and (user is None or self.user_groups.isdisjoint(groups)):
            return False
        if self.verbs is not None and info.verb not in self.verbs:
            return False
        if self.request_targets is not None and target not in self.request_targets:
            return False
        if self.clusters is not None and not (cluster and (cluster in self.clusters or "*" in self.clusters)):
            return False
        if self.namespaces is not None or self.resources is not None:
            if not info.is_resource_request:
                return False
            if self.namespaces is not None and info.namespace not in self.namespaces:
                return False
            if self.resources is None:
                return True
            group = info.api_group
            return any(gr.group == group and gr.matches(info.resource, info.subresource, info.name)
                       for gr in self.resources)
        if self.non_resource_urls is not None:
            if info.is_resource_request:
                return False
            path = info.path
            return any(spec == "*" or spec == path or (spec.endswith("*") and path.startswith(spec[:-1]))
                       for spec in self.non_resource_urls)
        return True


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[PolicyRule, ...]
    omit_stages: frozenset[str] = frozenset()
    omit_managed_fields: bool = False

    def rule_for(self, user: str | None, groups: tuple[str, ...], info: RequestInfo, target: str | None = None,
                 cluster: str = "") -> PolicyRule | None:
        """The first rule matching the request (None: no rule does, the request is not logged)."""
        for rule in self.rules:
            if rule.matches(user, groups, info, target, cluster):
                return rule
        return None


DEFAULT_POLICY = Policy((PolicyRule(METADATA),))

_RULE_FIELDS = frozenset(("level", "users", "userGroups", "verbs", "resources", "namespaces", "nonResourceURLs",
                          "omitStages", "omitManagedFields", "requestTargets", "clusters"))
_POLICY_FIELDS = frozenset(("apiVersion", "kind", "metadata", "rules", "omitStages", "omitManagedFields"))
_GROUP_RESOURCE_FIELDS = frozenset(("group", "resources", "resourceNames"))
_RESOURCE_FORM = re.compile(r"(\*|[a-z0-9][a-z0-9.-]*)(/(\*|[a-z0-9][a-z0-9.-]*))?$")


def load_policy(path: str) -> Policy:
    """Read a policy file (YAML or JSON); PolicyError for one that cannot be read or is not valid."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as error:
        raise PolicyError(f"cannot be read: {error.strerror or error}") from None
    try:
        data = yaml.load(text, Loader=yaml.CSafeLoader)  # noqa: S506 - the safe C loader
    except yaml.YAMLError as error:
        raise PolicyError(f"is not valid YAML or JSON: {' '.join(str(error).split())}") from None
    return parse_policy(data)


def parse_policy(data: object) -> Policy:
    """Check and compile a decoded policy document, as strictly as the API server and then some:
    unknown fields, misplaced wildcards and selectors that could never match are refused."""
    if not isinstance(data, dict):
        raise PolicyError("must be an audit.k8s.io/v1 Policy object")
    unknown = sorted(set(map(str, data)) - _POLICY_FIELDS)
    if unknown:
        raise PolicyError(f"{unknown[0]}: unknown field")
    if data.get("apiVersion") not in POLICY_VERSIONS or data.get("kind") != "Policy":
        raise PolicyError(f"must have apiVersion: audit.k8s.io/v1 and kind: Policy, not "
                          f"{data.get('apiVersion')!r} and {data.get('kind')!r}")
    if "metadata" in data and not isinstance(data["metadata"], dict | None):
        raise PolicyError("metadata: must be an object")
    omit_stages = _stages(data.get("omitStages"), "omitStages")
    omit_managed = _boolean(data.get("omitManagedFields", False), "omitManagedFields")
    rules = data.get("rules")
    if rules is None or rules == []:
        raise PolicyError("rules: a policy needs at least one rule (the API server refuses a policy with 0 rules)")
    if not isinstance(rules, list):
        raise PolicyError("rules: must be a list")
    return Policy(tuple(_rule(rule, f"rules[{i}]", omit_stages, omit_managed) for i, rule in enumerate(rules)),
                  omit_stages, omit_managed)


def _rule(data: object, where: str, policy_omit: frozenset[str], policy_omit_managed: bool) -> PolicyRule:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: must be an object")
    unknown = sorted(set(map(str, data)) - _RULE_FIELDS)
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}: unknown field")
    level = data.get("level")
    if level not in LEVELS:
        raise PolicyError(f"{where}.level: must be one of {', '.join(LEVELS)}, not {level!r}"
                          if level is not None else f"{where}.level: is required")
    non_resource = _strings(data, "nonResourceURLs", where)
    for i, url in enumerate(non_resource or ()):
        if url != "*" and not url.startswith("/"):
            raise PolicyError(f"{where}.nonResourceURLs[{i}]: must begin with '/' (or be '*'), not {url!r}")
        if "*" in url[:-1]:
            raise PolicyError(f"{where}.nonResourceURLs[{i}]: '*' may only be the last character, not {url!r}")
    resources = _group_resources(data.get("resources"), f"{where}.resources")
    namespaces = _strings(data, "namespaces", where, allow_empty_string=True)
    if non_resource is not None and (resources is not None or namespaces is not None):
        raise PolicyError(f"{where}.nonResourceURLs: a rule cannot select both resources (resources, namespaces) "
                          "and non-resource URLs")
    targets = _strings(data, "requestTargets", where)
    for i, target in enumerate(targets or ()):
        if target not in RequestTarget.__members__:
            raise PolicyError(f"{where}.requestTargets[{i}]: must be one of {', '.join(RequestTarget.__members__)}, "
                              f"not {target!r}")
    clusters = _strings(data, "clusters", where)
    for i, cluster in enumerate(clusters or ()):
        if cluster != "*" and not DNS_SUBDOMAIN.match(cluster):
            raise PolicyError(f"{where}.clusters[{i}]: must be a cluster name or '*', not {cluster!r}")
    omit_managed = data.get("omitManagedFields")
    return PolicyRule(
        level=LEVELS.index(level), users=_frozen(_strings(data, "users", where)),
        user_groups=_frozen(_strings(data, "userGroups", where)), verbs=_frozen(_strings(data, "verbs", where)),
        resources=resources, namespaces=_frozen(namespaces), non_resource_urls=non_resource,
        omit_stages=policy_omit | _stages(data.get("omitStages"), f"{where}.omitStages"),
        request_targets=_frozen(targets), clusters=_frozen(clusters),
        omit_managed_fields=policy_omit_managed if omit_managed is None else _boolean(omit_managed, f"{where}.omitManagedFields"))


_NO_WILDCARD = frozenset(("users", "userGroups", "verbs", "namespaces"))


def _strings(data: dict[str, Any], key: str, where: str, *, allow_empty_string: bool = False) -> tuple[str, ...] | None:
    """A list of strings; None when absent or empty (the API server: an empty list matches all)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and (v or allow_empty_string) for v in value):
        raise PolicyError(f"{where}.{key}: must be a list of {'' if allow_empty_string else 'non-empty '}strings")
    if key in _NO_WILDCARD and "*" in value:
        raise PolicyError(f"{where}.{key}[{value.index('*')}]: '*' is no wildcard in an audit policy and would match "
                          f"nothing; leave {key} out to match every one")
    return tuple(value) or None


def _frozen(values: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _group_resources(value: object, where: str) -> tuple[GroupResources, ...] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise PolicyError(f"{where}: must be a list of {{group, resources, resourceNames}}")
    found = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise PolicyError(f"{here}: must be an object with group, resources, resourceNames")
        unknown = sorted(set(map(str, item)) - _GROUP_RESOURCE_FIELDS)
        if unknown:
            raise PolicyError(f"{here}.{unknown[0]}: unknown field"
                              + (" (audit policies name it group, not apiGroups)" if unknown[0] == "apiGroups" else ""))
        group = item.get("group", "")
        if not isinstance(group, str) or (group and not DNS_SUBDOMAIN.match(group)):
            raise PolicyError(f"{here}.group: must be an API group name (\"\" for the core group), not {group!r}")
        resources = _strings(item, "resources", here) or ()
        for j, resource in enumerate(resources):
            if not _RESOURCE_FORM.match(resource) or resource == "*/*":
                raise PolicyError(f"{here}.resources[{j}]: must be RESOURCE, RESOURCE/SUBRESOURCE, '*', "
                                  f"'*/SUBRESOURCE' or 'RESOURCE/*', not {resource!r}")
        names = _strings(item, "resourceNames", here) or ()
        if names and not resources:
            raise PolicyError(f"{here}.resourceNames: needs at least one resource")
        found.append(GroupResources(group, resources, frozenset(names)))
    return tuple(found)


def _stages(value: object, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise PolicyError(f"{where}: must be a list of stages")
    for i, stage in enumerate(value):
        if stage not in STAGES:
            raise PolicyError(f"{where}[{i}]: must be one of {', '.join(STAGES)}, not {stage!r}")
    return frozenset(value)


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where}: must be true or false, not {value!r}")
    return value


# --- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuditConfig(LogFile):
    """The [audit] table: where events go and how files rotate (LogFile), which requests at what level."""

    policy_file: str | None = None      # None: every request at Metadata
    max_object_bytes: int = 65536       # larger request/response objects are left out (an annotation says so)
    policy: Policy = field(default=DEFAULT_POLICY, compare=False)


def parse_audit_config(data: object) -> AuditConfig:
    """The [audit] table, its policy file loaded and checked; ConfigError naming the key otherwise."""
    t = _Table(data, "audit")
    log_file = log_file_fields(t)
    policy_file = t.file("policy_file")
    policy = DEFAULT_POLICY
    if policy_file is not None:
        try:
            policy = load_policy(policy_file)
        except PolicyError as error:
            raise ConfigError(f"{t.key('policy_file')}: {policy_file}: {error}") from None
    config = AuditConfig(
        **log_file, policy_file=policy_file,
        max_object_bytes=t.positive("max_object_bytes", int, 65536),
        policy=policy,
    )
    t.finish()
    return config


# --- secrets ------------------------------------------------------------------------------------

_SECRET_SUFFIXES = ("password", "passwd", "token", "secret")
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def redact(node: Any, omit_managed_fields: bool = False) -> Any:
    """A copy of a decoded object with its secrets replaced by REDACTED: every `Authorization`,
    string fields whose name ends in password, token or secret (`status.token`, `clientSecret`…),
    `spec.key` (access keys), the values of a Secret's `data` and `stringData` (the keys stay) and
    its last-applied annotation (which repeats them); `metadata.managedFields` go when asked."""
    if isinstance(node, dict):
        secret = node.get("kind") == "Secret"
        out: dict[Any, Any] = {}
        for key, value in node.items():
            lowered = key.lower() if isinstance(key, str) else ""
            if lowered == "authorization" or (isinstance(value, str) and value and lowered.endswith(_SECRET_SUFFIXES)):
                out[key] = REDACTED
            elif secret and key in ("data", "stringData") and isinstance(value, dict):
                out[key] = {name: REDACTED for name in value}
            elif key == "spec" and isinstance(value, dict) and isinstance(value.get("key"), str) and value["key"]:
                out[key] = {**redact(value, omit_managed_fields), "key": REDACTED}
            elif key == "metadata" and isinstance(value, dict):
                meta = redact(value, omit_managed_fields)
                if omit_managed_fields:
                    meta.pop("managedFields", None)
                annotations = meta.get("annotations")
                if secret and isinstance(annotations, dict) and _LAST_APPLIED in annotations:
                    meta["annotations"] = {**annotations, _LAST_APPLIED: REDACTED}
                out[key] = meta
            else:
                out[key] = redact(value, omit_managed_fields)
        return out
    if isinstance(node, list):
        return [redact(item, omit_managed_fields) for item in node]
    return node


# --- the observer -------------------------------------------------------------------------------

class _Request:
    """What the observer keeps of one logged request between its start and its finish."""

    __slots__ = ("ctx", "rule", "received", "prefix", "long_running", "started_sent", "request_object",
                 "response_object")

    def __init__(self, ctx: RequestContext, rule: PolicyRule, received: bytes, prefix: bytes, long_running: bool):
        self.ctx = ctx
        self.rule = rule
        self.received = received    # requestReceivedTimestamp
        self.prefix = prefix        # the fields every stage repeats, up to and with requestReceivedTimestamp
        self.long_running = long_running
        self.started_sent = False
        self.request_object = b""   # ',"requestObject":{…}' once given
        self.response_object = b""

    def annotate(self, key: str, value: str) -> None:
        """One more annotation (rare: the prefix is decoded and encoded again)."""
        head = orjson.loads(self.prefix[:self.prefix.rindex(_RECEIVED_KEY)] + b"}")
        head["annotations"] = {**head.get("annotations", {}), key: value}
        self.prefix = b'%s%s%s"' % (orjson.dumps(head)[:-1], _RECEIVED_KEY, self.received)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the events of every request alike share (same identity, method, target, peer and the
    headers the events read): the rule, and the request's fields encoded around its auditID."""

    identity: Identity | None  # held: the cache key has its id, which is not another's while held
    rule: PolicyRule | None    # None: not logged
    before_id: bytes = b""     # '{"kind":"Event",…,"auditID":"'
    after_id: bytes = b""      # '","requestURI":…,"requestReceivedTimestamp":"'
    long_running: bool = False


SHAPES_KEPT = 4096  # request shapes cached; the cache starts over when full


_second = (-1, b"")  # (a whole second, its RFC 3339 date and time): formatted once a second


def _new_second(whole: int) -> tuple[int, bytes]:
    global _second
    _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode())
    return _second


_MILLIS = [b".%03d" % n for n in range(1000)]
_MICROS = [b"%03dZ" % n for n in range(1000)]


def _stamp_pieces(base: int, micros: int) -> tuple[bytes, bytes, bytes]:
    """The pieces of the timestamp `micros` microseconds after the whole second `base`."""
    whole, micros = divmod(micros, 1000000)
    whole += base
    second = _second if _second[0] == whole else _new_second(whole)
    return second[1], _MILLIS[micros // 1000], _MICROS[micros % 1000]


def _stamp(wall: float) -> bytes:
    """An RFC 3339 UTC timestamp with microseconds (truncated: never 1000000), from one int() of
    the time in microseconds and integer arithmetic (cheaper than an int() of each part)."""
    micros = int(wall * 1e6)
    whole = micros // 1000000
    micros -= whole * 1000000
    second = _second if _second[0] == whole else _new_second(whole)
    return b"".join((second[1], _MILLIS[micros // 1000], _MICROS[micros % 1000]))


# First bytes of the request header names the observer reads: User-Agent, X-Forwarded-For,
# X-Real-Ip, Impersonate-* (any case).
_HEADER_INITIALS = frozenset(b"UuXxIi")


def _noted_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None, bytes | None,
                                                                tuple[tuple[bytes, bytes], ...]]:
    """User-Agent, X-Forwarded-For, X-Real-Ip and the Impersonate-* headers (names lower-cased),
    as headers.scan_client_headers notes them, for a request whose handler made no such scan."""
    user_agent = forwarded = real_ip = None
    impersonation: tuple[tuple[bytes, bytes], ...] = ()
    for name, value in headers:
        if name and name[0] in _HEADER_INITIALS:
            lowered = name.lower()
            if lowered == b"user-agent":
                user_agent = value
            elif lowered == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif lowered == b"x-real-ip":
                real_ip = value
            elif lowered.startswith(b"impersonate-"):
                impersonation += ((lowered, value),)
    return user_agent, forwarded, real_ip, impersonation


class AuditObserver:
    """The audit log as a batched request observer (context.BatchObserver): `start_batch`,
    `finish_batch`, and for the gateway `tick` (once a second), `record_bodies` and `close`.

    Called from the event loop's thread only; the file is written by a thread of its own.
    """

    def __init__(self, config: AuditConfig, *, max_queued: int = 8192, max_queued_bytes: int = 64 << 20,
                 sink: Sink | None = None):
        self.config = config
        self.policy = config.policy
        self.max_object_bytes = config.max_object_bytes
        if sink is None:  # else: where the lines go instead of config.path
            sink = open_sink(config)
        self.writer = BackgroundWriter(sink, max_lines=max_queued, max_bytes=max_queued_bytes, what="audit log",
                                       name="audit-writer")
        self._put_run = self.writer.put_run
        # The default policy (every request at Metadata) needs no rule matching.
        self.catch_all = self.policy.rules[0] if self.policy == DEFAULT_POLICY else None
        # The logged requests in flight, by their context (hashed by identity: no id() call, which
        # raises an audit hook event each time); and those still owed a ResponseStarted.
        self.requests: dict[RequestContext, _Request] = {}
        self.long_running: dict[RequestContext, _Request] = {}
        self._ids = RequestIds()  # for requests without a request id (no access log)
        self._shapes: dict[tuple, _Shape] = {}
        self.failures = 0            # events that could not be made (a bug: logged once a minute)
        self._failure_logged_at = 0.0

    @property
    def dropped(self) -> int:
        """Events lost: the queue was full, or the file could not be written."""
        return self.writer.dropped

    @property
    def written(self) -> int:
        return self.writer.written

    # --- the BatchObserver protocol ----------------------------------------------------------------

    batched = True

    def start_batch(self, begun: list[RequestContext]) -> None:
        """Each request's level, decided once, and its RequestReceived event; a request already
        finished (its `ended` is set just before the observers' finish) gets its last events too,
        and leaves no state. Queued as one write.

        One loop, with no Python call per request on its usual path: in this interpreter a call
        costs about as much as making both events of a request seen before (whose fields are
        cached as its _Shape), so the timestamps are written out here; the headers it reads come
        from the handler's own scan of them (RequestContext.found), scanned here only for the
        requests no handler scanned."""
        pieces: list[bytes] = []  # of lines, joined once for the whole batch
        extend = pieces.extend
        count = 0
        wall = time.time() - time.monotonic()  # + a monotonic time: that time on the wall clock
        # The whole second the batch's first request began in, and `offset` + a monotonic time:
        # the seconds since then, exact to well under a microsecond (a difference of close floats).
        base = int(wall + begun[0].started) if begun else 0
        offset = wall - base
        date = (_second if _second[0] == base else _new_second(base))[1]
        requests, shapes = self.requests, self._shapes
        for ctx in begun:
            try:
                if ctx in requests:  # begun already, for record_bodies
                    continue
                head = ctx.head
                found = ctx.found
                if found is not None:  # what the handler's scan of the headers found
                    user_agent, forwarded, real_ip = found.user_agent, found.forwarded_for, found.real_ip
                    impersonation = () if found.impersonation is None else tuple(found.impersonation)
                else:
                    user_agent, forwarded, real_ip, impersonation = _noted_headers(head.headers)
                # All the events depend on (the shape holds the identity, whose id is in the key).
                key = (id(ctx.identity), head.method, head.target, head.client_ip, head.upgrade, user_agent,
                       forwarded, real_ip, impersonation)
                shape = shapes.get(key) or self._shape(ctx, key)
                rule = shape.rule
                if rule is None:
                    continue
                audit_id = ctx.id_line[ID_AT:-2] or self._ids.new_id()
                # requestReceivedTimestamp: microseconds into the batch's second, small-integer arithmetic.
                micros = int((offset + ctx.started) * 1e6)
                received = ((date, _MILLIS[micros // 1000], _MICROS[micros % 1000]) if 0 <= micros < 1000000
                            else _stamp_pieces(base, micros))
                if ctx.ended and not rule.omit_stages and not shape.long_running and ctx.status in _COMPLETE:
                    # Finished as usual already: both events now, as pieces, and no state.
                    micros = int((offset + ctx.ended) * 1e6)
                    extend((shape.before_id, audit_id, shape.after_id, *received, b'"', _RECEIVED, *received, b'"}\n',
                            shape.before_id, audit_id, shape.after_id, *received, b'"', _COMPLETE[ctx.status],
                            *((date, _MILLIS[micros // 1000], _MICROS[micros % 1000]) if 0 <= micros < 1000000
                              else _stamp_pieces(base, micros)), b'"}\n'))
                    count += 2
                    continue
                state = _Request(ctx, rule, b"".join(received),
                                 b"".join((shape.before_id, audit_id, shape.after_id, *received, b'"')), shape.long_running)
                if "RequestReceived" not in rule.omit_stages:
                    extend((state.prefix, _RECEIVED, state.received, b'"}\n'))
                    count += 1
                if ctx.ended:
                    count += self._end(state, wall, pieces)
                    continue
                requests[ctx] = state
                if shape.long_running:
                    self.long_running[ctx] = state
            except Exception:  # noqa: BLE001 - the audit log must never break a request
                self._failed("start")
        self._put_run(pieces, count)

    def finish_batch(self, done: list[RequestContext]) -> None:
        """The last events of the requests begun in an earlier batch (and a ResponseStarted still
        owed, when the first byte's time is known)."""
        lines: list[bytes] = []
        wall = time.time() - time.monotonic()
        end = self._end
        count = 0
        for state in filter(None, map(self.requests.pop, done, repeat(None))):
            count += end(state, wall, lines)
        self._put_run(lines, count)

    def _end(self, state: _Request, wall: float, lines: list[bytes]) -> int:
        """Append a request's last event (and a ResponseStarted still owed) to `lines`; how many."""
        ctx = state.ctx
        count = 0
        try:
            if state.long_running:
                self.long_running.pop(ctx, None)
                if not state.started_sent and ctx.first_byte:
                    lines.append(self._started(state, wall + ctx.first_byte))
                    count += 1
            code = ctx.status
            middle = _COMPLETE.get(code)  # the usual answers' stage fields, made once
            if middle is None:
                middle = _last_stage(ctx)
                if not code:
                    state.annotate("fastproxy/response", "none: the client left first")
            omit = state.rule.omit_stages
            if omit and ("Panic" if middle.startswith(_PANIC) else "ResponseComplete") in omit:
                return count
            lines.append(b"".join((state.prefix, state.request_object, state.response_object, middle,
                                   _stamp(wall + ctx.ended), b'"}\n')))
            return count + 1
        except Exception:  # noqa: BLE001 - the audit log must never break a request
            self.long_running.pop(ctx, None)
            self._failed("finish")
            return count

    def _shape(self, ctx: RequestContext, key: tuple) -> _Shape:
        """The level and encoded fields of a request not seen before (nor any like it), kept."""
        shape = self._new_shape(ctx, *key[5:])
        if len(self._shapes) >= SHAPES_KEPT:
            self._shapes.clear()
        self._shapes[key] = shape
        return shape

    def _new_shape(self, ctx: RequestContext, user_agent: bytes | None, forwarded: bytes | None,
                   real_ip: bytes | None, impersonation: tuple[tuple[bytes, bytes], ...]) -> _Shape:
        where = ctx.route
        info = ctx.info
        identity = ctx.identity
        target = REQUEST_TARGETS.get(where.kind) if where is not None else None
        if where is not None and target is not None and info is not None:
            uri = f"{where.path}?{where.query}" if where.query else where.path
        else:
            # No API server behind it (health, /auth/…, refused before routing): its whole path, and
            # no query, which carries OAuth codes and state on /oidc/ and /auth/.
            uri = ctx.head.target.decode("latin-1").partition("?")[0]
            info = RequestInfo(False, uri, ctx.method.lower()) if info is None else info._replace(path=uri)
        cluster = where.cluster if where is not None else ""
        rule = self.catch_all or self.policy.rule_for(identity.user if identity is not None else None,
                                                      identity.groups if identity is not None else (),
                                                      info, target, cluster)
        if rule is None or rule.level == NONE:
            return _Shape(identity, None)
        resource_request, _, verb, _, group, version, namespace, resource, subresource, name, _ = info
        fields: dict[str, Any] = {"requestURI": uri, "verb": verb,
                                  "user": {"username": identity.user, "groups": identity.groups}
                                  if identity is not None else {}}
        impersonated = None
        for lowered, value in impersonation:
            impersonated = _impersonation(impersonated, lowered, value)
        if impersonated is not None and "username" in impersonated:
            fields["impersonatedUser"] = impersonated
        fields["sourceIPs"] = _source_ips(ctx.head.client_ip, forwarded, real_ip)
        if user_agent:
            fields["userAgent"] = user_agent.decode("utf-8", "replace")
        if resource_request:
            ref = {"resource": resource}
            if namespace:
                ref["namespace"] = namespace
            if name:
                ref["name"] = name
            if group:
                ref["apiGroup"] = group
            if version:
                ref["apiVersion"] = version
            if subresource:
                ref["subresource"] = subresource
            fields["objectRef"] = ref
        annotations = {}
        if target is not None:
            annotations["fastproxy/requestTarget"] = target
        if cluster:
            annotations["fastproxy/cluster"] = cluster
        if where is not None and where.virtual_cluster:
            annotations["fastproxy/virtualCluster"] = f"{where.namespace}/{where.virtual_cluster}"
        if identity is not None:
            annotations["fastproxy/accessKey"] = identity.source
        if annotations:
            fields["annotations"] = annotations
        long_running = (ctx.head.upgrade or verb in LONG_RUNNING_VERBS or subresource in LONG_RUNNING_SUBRESOURCES) \
            and "ResponseStarted" not in rule.omit_stages
        before = b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"%s","auditID":"' % LEVELS[rule.level].encode()
        after = b'",%s%s' % (orjson.dumps(fields)[1:-1], _RECEIVED_KEY)
        return _Shape(identity, rule, before, after, long_running)

    # --- what the gateway and its handlers call -----------------------------------------------------

    def tick(self) -> None:
        """Once a second, after the batches: ResponseStarted for the long-running requests whose response has begun."""
        if not self.long_running:
            return
        now = time.time()
        wall = now - time.monotonic()
        lines = []
        for key, state in list(self.long_running.items()):
            ctx = state.ctx
            if ctx.status:
                del self.long_running[key]
                lines.append(self._started(state, wall + ctx.first_byte if ctx.first_byte else now))
        self._put_run(lines, len(lines))

    def record_bodies(self, ctx: RequestContext, request: bytes | Mapping[str, Any] | None = None,
                      response: bytes | Mapping[str, Any] | None = None) -> None:
        """Give the request's and response's objects (JSON or YAML bytes, or decoded) for its last
        event, before the response is finished: kept at levels Request (the request's) and
        RequestResponse (both), redacted, and left out with an annotation beyond max_object_bytes."""
        state = self.requests.get(ctx)
        if state is None and not ctx.ended:  # its start not handed over yet: taken now
            self.start_batch([ctx])
            state = self.requests.get(ctx)
        if state is None or state.rule.level < REQUEST:
            return
        try:
            if request is not None:
                state.request_object = self._object(state, "requestObject", request)
            if response is not None and state.rule.level == REQUEST_RESPONSE:
                state.response_object = self._object(state, "responseObject", response)
        except Exception:  # noqa: BLE001
            self._failed("bodies")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the events so far are written (or dropped)."""
        return self.writer.flush(timeout)

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        self.writer.close()

    # --- making events -----------------------------------------------------------------------------

    def _failed(self, where: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if now >= self._failure_logged_at:
            self._failure_logged_at = now + 60.0
            log.exception("audit log: an event could not be made at the request's %s (%d so far)", where, self.failures)

    def _started(self, state: _Request, wall: float) -> bytes:
        """ResponseStarted, for a request start marked long-running (it does so only when the rule keeps that stage)."""
        state.started_sent = True
        return b"%s%s%s\"}\n" % (state.prefix, _stage_fields(b"ResponseStarted", b'{"metadata":{},"code":%d}'
                                                               % state.ctx.status), _stamp(wall))

    def _object(self, state: _Request, which: str, value: bytes | Mapping[str, Any]) -> bytes:
        """',"requestObject":{…}' (or responseObject), redacted; b"" and an annotation when it is left out."""
        limit = self.max_object_bytes
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            decoded = _decode(raw) if len(raw) <= limit else None
            why = f"{len(raw)} bytes, more than max_object_bytes {limit}" if len(raw) > limit else "neither JSON nor YAML"
        else:
            decoded, why = value, ""
        if decoded is not None:
            encoded = orjson.dumps(redact(decoded, state.rule.omit_managed_fields), option=orjson.OPT_NON_STR_KEYS)
            if len(encoded) <= limit:
                return b',"%s":%s' % (which.encode(), encoded)
            why = f"{len(encoded)} bytes, more than max_object_bytes {limit}"
        state.annotate(f"fastproxy/{which}", f"left out: {why}")
        return b""


def _decode(raw: bytes) -> Any:
    """A JSON document, or a YAML object decoded safely (aliases refused, nodes bounded); None."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return decode_object(raw, "application/yaml")
    except StatusError:
        return None


def _impersonation(found: dict[str, Any] | None, name: bytes, value: bytes) -> dict[str, Any]:
    """Add one client Impersonate-* header to the impersonated user it asks for (values only)."""
    found = {} if found is None else found
    text = value.decode("utf-8", "replace").strip()
    if name == b"impersonate-user":
        found["username"] = text
    elif name == b"impersonate-group":
        found.setdefault("groups", []).append(text)
    elif name == b"impersonate-uid":
        found["uid"] = text
    elif name.startswith(b"impersonate-extra-"):
        key = unquote(name[len(b"impersonate-extra-"):].decode("latin-1"))
        found.setdefault("extra", {}).setdefault(key, []).append(text)
    return found


def _source_ips(client_ip: bytes, forwarded: bytes | None, real_ip: bytes | None) -> list[str]:
    """As the API server: X-Forwarded-For's addresses, X-Real-Ip, then the peer (the one that
    cannot be made up), without repeating the last."""
    peer = client_ip.decode("latin-1")
    if forwarded is None and real_ip is None:
        return [peer]
    found: list[str] = []
    for part in (forwarded or b"").split(b","):
        address = _address(part)
        if address is not None:
            found.append(address)
    if real_ip is not None:
        address = _address(real_ip)
        if address is not None and address not in found:
            found.append(address)
    if not found or found[-1] != peer:
        found.append(peer)
    return found


def _address(text: bytes) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip().decode("latin-1")))
    except ValueError:
        return None


def _stage_fields(stage: bytes, status: bytes) -> bytes:
    """An event's fields after the request's: its stage and responseStatus, up to stageTimestamp's value."""
    return b'%s"stage":"%s"%s%s,"stageTimestamp":"' % (b",", stage, b',"responseStatus":' if status else b"", status)


_RECEIVED_KEY = b',"requestReceivedTimestamp":"'
_RECEIVED = _stage_fields(b"RequestReceived", b"")
_PANIC = _stage_fields(b"Panic", b"")[:-len(',"stageTimestamp":"')]
_COMPLETE = {code: _stage_fields(b"ResponseComplete", b'{"metadata":{},"code":%d}' % code)
             for code in (101, 200, 201, 202, 204, 206, 304)}


def _last_stage(ctx: RequestContext) -> bytes:
    """The last event's stage fields: ResponseComplete, or Panic for a handler's uncaught exception."""
    code = ctx.status
    stage = b"Panic" if code == 500 and ctx.message == INTERNAL_ERROR else b"ResponseComplete"
    return _stage_fields(stage, _response_status(ctx))


def _response_status(ctx: RequestContext) -> bytes:
    """The encoded responseStatus (b"": the client left before any response)."""
    code = ctx.status
    if not code:
        return b""
    if code < 400:
        return b'{"metadata":{},"code":%d}' % code
    status: dict[str, Any] = {"metadata": {}, "status": "Failure"}
    if ctx.message:
        status["message"] = ctx.message
    reason = REASONS.get(code)
    if reason:
        status["reason"] = reason
    status["code"] = code
    return orjson.dumps(status)
