"""The management API (management.loft.sh/v1), served in process under /kubernetes/management/.

`ManagementAPI.responder` authenticates the caller and applies its access key's scope (request
target Management) before anything else; `ManagementRequest` then answers from this worker's
snapshot of the state store (get, list, watch: no I/O on the loop), or writes through the
store's admin side on a thread of its own and answers once the worker's snapshot holds the write
(so a client reads what it wrote, whichever request comes next). Discovery, OpenAPI, tables and
validation come from `schema`, conversions from `objects`, watches from `watch`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from .. import headers as hdrs
from ..auth.credentials import Authenticator, load_key_set, open_state_admin
from ..auth.identity import Identity, key_digest
from ..auth.passwords import PasswordError, check_password_text, hash_password
from ..auth.requestinfo import RequestInfo
from ..auth.scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, ScopeError, check_scope, covers, parse_scope, reaches_cluster
from ..auth.tokens import issue_token
from ..clusters import ClusterRegistry
from ..config import Config
from ..context import Observers, RequestContext
from ..exchange import Connection
from ..kube.patch import apply_patch
from ..kube.selectors import FieldSelector, LabelSelector, Selection
from ..local import LocalResponder
from ..status import StatusError, forbidden
from ..store import (
    AccessKey,
    AlreadyExistsError,
    ConflictError,
    InvalidError,
    NotFoundError,
    Snapshot,
    StateAdmin,
    StoreError,
    Team,
    UnavailableError,
    User,
    VirtualClusterInstance,
)
from ..store.base import (
    ACCESS_KEY_FIELDS,
    INSTANCE_FIELDS,
    TEAM_FIELDS,
    check_instance,
    check_object_name,
    checked_changes,
    user_changes,
    user_groups,
)
from ..vcinstances import instance_phase
from . import body, objects, schema
from .probe import ClusterProbe
from .watch import Event, EventLog, WatchStream

if TYPE_CHECKING:
    from ..observe.audit import AuditObserver
    from .schema import Resource

log = logging.getLogger("fastproxy.management")

GROUP = "management.loft.sh"
ADMINS = "loft:admins"
DEFAULT_TOKEN_TTL = 3600
WATCH_TIMEOUT = 1800.0      # seconds a watch lasts unless it asks for less (timeoutSeconds)
WRITE_VISIBLE_TIMEOUT = 5.0  # how long a write waits for this worker's snapshot to show it


class ManagementAPI:
    """The handler of /kubernetes/management/: one per worker, one ManagementRequest per request."""

    def __init__(self, config: Config, authenticator: Authenticator, clusters: ClusterRegistry,
                 loop: asyncio.AbstractEventLoop, audit: AuditObserver | None = None):
        self.config = config
        self.audit = audit  # given the bodies of requests and responses, for Request(Response)-level events
        self.authenticator = authenticator
        self.clusters = clusters
        self.loop = loop
        self.reader = authenticator.store.reader if authenticator.store is not None else None
        self.admin: StateAdmin | None = open_state_admin(config) if config.state is not None else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastproxy-management")
        self.keyset = (load_key_set(config) if config.tokens is not None and config.tokens.signing_keys_dir
                       else None)
        # Stable for one configuration on one host: what Self's instanceID tells a client.
        self.instance_id = hashlib.sha256(f"{socket.gethostname()}:{config.path}".encode()).hexdigest()[:16]
        self.started = time.time()
        self.snapshot: Snapshot | None = self.reader.snapshot if self.reader is not None else None
        self.events = EventLog(self.snapshot.version if self.snapshot is not None else 0)
        self.rendered: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}  # resource -> (version, objects)
        self.lists: dict[str, tuple[int, bytes]] = {}  # resource -> (version, its whole list, serialized)
        self.probe = ClusterProbe(clusters, loop, self._cluster_changed)
        self.cluster_version = 0
        if self.reader is not None:
            self.reader.subscribe(self._snapshot_changed)

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                  keep_alive: bool) -> ManagementRequest:
        found = hdrs.scan_client_headers(ctx.head.headers)
        if found.impersonation is not None:
            raise StatusError(403, "the management API does not support impersonation")
        credential = hdrs.bearer_credential(found, None)
        identity = ctx.identity = self.authenticator.authenticate(credential, None)
        info = ctx.info
        assert info is not None
        if identity.scope is not None:
            denial = check_scope(identity.scope, info, "Management")
            if denial is not None:
                raise StatusError(403, denial)
        return ManagementRequest(client, ctx, observers, keep_alive, self, credential)

    def start(self) -> None:
        self.probe.start()

    def tick(self) -> None:
        now = time.monotonic()
        for watch in list(self.events.watches):
            watch.tick(now)

    def close(self) -> None:
        self.probe.close()
        for watch in list(self.events.watches):
            watch.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.admin is not None:
            self.admin.close()

    # --- what requests read ------------------------------------------------------------------

    def current(self) -> Snapshot:
        if self.snapshot is None:
            raise StatusError(503, "this gateway has no [state] store: users, teams and access keys are not served")
        return self.snapshot

    def objects(self, plural: str) -> dict[str, dict[str, Any]]:
        """Every object of a resource in name order, rendered once per snapshot (or cluster probe) version."""
        if plural == "clusters":
            version = self.cluster_version
        elif plural == "namespaceactivities":
            version = self.current().activity_version
        else:
            version = self.current().version
        cached = self.rendered.get(plural)
        if cached is not None and cached[0] == version:
            return cached[1]
        if plural == "clusters":
            rendered = {name: self.cluster_object(name) for name in sorted(u.cluster.name for u in self.clusters)}
        else:
            snapshot = self.current()
            if plural == "users":
                member_of = objects.teams_of(snapshot)
                rendered = {name: objects.user_object(user, member_of.get(name, ()))
                            for name, user in sorted(snapshot.users.items())}
            elif plural == "teams":
                rendered = {name: objects.team_object(team) for name, team in sorted(snapshot.teams.items())}
            elif plural == "namespaceactivities":
                rendered = {f"{cluster}.{namespace}": objects.activity_object(activity, snapshot.activity_version)
                            for (cluster, namespace), activity in sorted(snapshot.activities.items())}
            elif plural == "virtualclusterinstances":
                rendered = {f"{namespace}/{name}": objects.instance_object(instance, *self.instance_status(instance))
                            for (namespace, name), instance in sorted(snapshot.virtual_cluster_instances.items())}
            else:
                rendered = {name: objects.access_key_object(key) for name, key in sorted(snapshot.access_keys.items())}
        self.rendered[plural] = (version, rendered)
        return rendered

    def whole_list(self, resource: Resource, version: int) -> bytes:
        """The unfiltered list of a resource, serialized once per version."""
        cached = self.lists.get(resource.plural)
        if cached is None or cached[0] != version:
            items = list(self.objects(resource.plural).values())
            cached = self.lists[resource.plural] = (version, orjson.dumps(list_object(resource, items, {
                "resourceVersion": str(version)})))
        return cached[1]

    def cluster_object(self, name: str) -> dict[str, Any]:
        upstream = self.clusters.get(name)
        health = self.probe.of(name)
        status: dict[str, Any] = {"phase": health.phase, "kubernetesVersion": health.kubernetes_version,
                                  "latencySeconds": round(health.latency, 6)}
        if health.checked:
            status["lastProbeTime"] = objects.timestamp(health.checked)
        if health.message:
            status["message"] = health.message
        cluster = upstream.cluster if upstream is not None else None
        server = f"{cluster.scheme}://{cluster.host}:{cluster.port}" if cluster is not None else ""
        return {"apiVersion": objects.API_VERSION, "kind": "Cluster",
                "metadata": {"name": name, "uid": "", "resourceVersion": str(self.cluster_version),
                             "creationTimestamp": objects.timestamp(self.started)},
                "spec": {"displayName": name, "server": server}, "status": status}

    def instance_status(self, instance: VirtualClusterInstance) -> tuple[str, str]:
        """Whether this gateway serves a virtual cluster instance (its configuration's win a clash)."""
        configured = ((config.cluster, config.namespace, config.name) for config in self.config.virtual_clusters)
        return instance_phase(instance, self.clusters.names, configured)

    def _snapshot_changed(self, snapshot: Snapshot) -> None:
        old, self.snapshot = self.snapshot, snapshot
        events = objects.snapshot_events(old, snapshot, self.instance_status) if old is not None else []
        self.events.append(events, snapshot.version)

    def _cluster_changed(self, name: str) -> None:
        self.cluster_version += 1
        self.events.append([Event(self.cluster_version, "MODIFIED", "clusters", self.cluster_object(name))],
                           self.events.version)

    # --- writes ------------------------------------------------------------------------------

    async def write(self, call: Callable[[StateAdmin], Any]) -> Any:
        """Run a store write on the management thread; StatusError for what the store refuses.
        Returns once this worker's snapshot includes the write."""
        admin = self.admin
        if admin is None or self.reader is None:
            raise StatusError(503, "this gateway has no [state] store: users, teams and access keys are not served")
        try:
            result = await self.loop.run_in_executor(self.executor, call, admin)
        except NotFoundError as error:
            raise StatusError(404, str(error)) from None
        except AlreadyExistsError as error:
            raise StatusError(409, str(error), reason="AlreadyExists") from None
        except ConflictError as error:
            raise StatusError(409, str(error), reason="Conflict") from None
        except UnavailableError as error:
            raise StatusError(503, str(error)) from None
        except (InvalidError, StoreError) as error:
            raise StatusError(422, str(error)) from None
        version = getattr(result[0] if isinstance(result, tuple) else result, "resource_version", 0)
        try:
            await asyncio.wait_for(self.reader.wait_for(version), WRITE_VISIBLE_TIMEOUT)
        except TimeoutError:
            log.warning("management: write %d not yet visible in this worker's snapshot", version)
        return result


class ManagementRequest(LocalResponder):
    """One management API request."""

    __slots__ = ("api", "credential", "content_type", "query", "watch", "key", "key_known")

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 api: ManagementAPI, credential: bytes):
        super().__init__(client, ctx, observers, keep_alive)
        self.api = api
        self.credential = credential
        self.content_type = self.header(b"content-type")
        self.query = dict(parse_qsl(ctx.route.query, keep_blank_values=True)) if ctx.route and ctx.route.query else {}
        self.watch: WatchStream | None = None
        self.key: AccessKey | None = None
        self.key_known = False

    @property
    def identity(self) -> Identity:
        identity = self.ctx.identity
        assert identity is not None
        return identity

    @property
    def info(self) -> RequestInfo:
        info = self.ctx.info
        assert info is not None
        return info

    def header(self, wanted: bytes) -> str:
        for name, value in self.ctx.head.headers:
            if name.lower() == wanted:
                return value.decode("latin-1")
        return ""

    def accept(self) -> str:
        return self.header(b"accept")

    def raw_body(self) -> bytes:
        return b"".join(self.body)

    def send(self, status: int, body: bytes, content_type: bytes = b"application/json",
             headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        audit = self.api.audit
        if audit is not None:  # before the response goes out: the event is complete when it ends
            audit.record_bodies(self.ctx, self.raw_body() or None, body)
        super().send(status, body, content_type, headers)

    # --- dispatch ----------------------------------------------------------------------------

    def handle(self) -> None:
        info = self.info
        if not info.is_resource_request:
            self.non_resource(info)
        elif info.api_group == "authentication.k8s.io" and info.resource == "selfsubjectreviews" and info.verb == "create":
            self.send_json(201, self.self_subject_review())
        elif info.api_group != GROUP or info.api_version != "v1":
            raise StatusError(404, "the server could not find the requested resource")
        else:
            resource = schema.resource(info.resource)
            verb = info.verb
            # Cluster-scoped: never below namespaces/NS; namespaced: there, but for a list or watch of all.
            if resource is None or info.subresource or (bool(info.namespace) != resource.namespaced
                                                        and (info.namespace or verb not in ("list", "watch"))):
                raise StatusError(404, "the server could not find the requested resource")
            if verb not in resource.verbs:
                raise StatusError(405, f"the server does not allow this method on the requested resource "
                                       f"({verb} {resource.plural})")
            self.authorize(resource, verb, info.name)
            self.serve_verb(resource, verb, info.name)

    def non_resource(self, info: RequestInfo) -> None:
        if info.verb not in ("get", "head"):
            raise StatusError(405, f"the server does not allow {info.verb} on {info.path}")
        path = info.path.rstrip("/") or "/"
        if path == "/version":
            self.send_json(200, schema.version_info())
        elif path in ("/api", "/apis"):
            form = schema.discovery_form(self.accept())
            if form is not None:
                self.send(200, orjson.dumps(schema.aggregated_discovery(form, legacy=path == "/api")),
                          b"application/json;g=apidiscovery.k8s.io;v=%s;as=APIGroupDiscoveryList" % form.encode())
            else:
                self.send_json(200, schema.api_versions() if path == "/api" else schema.api_group_list())
        elif path == f"/apis/{GROUP}":
            self.send_json(200, schema.api_group())
        elif path == f"/apis/{GROUP}/v1":
            self.send_json(200, schema.api_resource_list())
        elif path == "/openapi/v2":
            document, content_type = schema.openapi_v2(self.accept())
            self.send(200, document, content_type.encode())
        elif path == "/openapi/v3":
            self.send_json(200, schema.openapi_v3_index())
        elif path == f"/openapi/v3/apis/{GROUP}/v1":
            self.send(200, schema.openapi_v3_group())
        else:
            raise StatusError(404, "the server could not find the requested resource")

    # --- authorization -----------------------------------------------------------------------

    def is_admin(self) -> bool:
        return ADMINS in self.identity.groups

    def caller_key(self) -> AccessKey | None:
        """The state-store access key the request presented (None: a static key or a token),
        looked up once per request: authorization and filtering both ask."""
        if not self.key_known:
            snapshot = self.api.snapshot
            entry = snapshot.keys.get(key_digest(self.credential)) if snapshot is not None else None
            self.key, self.key_known = (entry.access_key if entry is not None else None), True
        return self.key

    def caller_user(self) -> User | None:
        key = self.caller_key()
        snapshot = self.api.snapshot
        if key is None or key.user is None or snapshot is None:
            return None
        return snapshot.users.get(key.user)

    def authorize(self, resource: Resource, verb: str, name: str) -> None:
        plural = resource.plural
        if plural in ("selves", "directclusterendpointtokens", "ownedaccesskeys", "clusters") or self.is_admin():
            return  # every identity may use these; what each sees is filtered below
        user = self.caller_user()
        if plural == "users" and verb == "get" and user is not None and name == user.name:
            return
        raise forbidden(self.identity.user, verb, plural, GROUP, self.info.namespace, name)

    def visible(self, plural: str) -> Callable[[dict[str, Any]], bool] | None:
        """Which objects of a resource the caller may see (None: all of them)."""
        if plural == "ownedaccesskeys":
            user = self.caller_user()
            owner = user.name if user is not None else None
            return lambda obj: owner is not None and obj["spec"].get("user") == owner
        if plural == "clusters":
            scope = self.identity.scope
            return None if scope is None else lambda obj: reaches_cluster(scope, obj["metadata"]["name"])
        if plural == "users" and not self.is_admin():
            user = self.caller_user()
            return lambda obj: user is not None and obj["metadata"]["name"] == user.name
        namespace = self.info.namespace
        if namespace:  # a namespaced resource, asked for in one namespace
            return lambda obj: obj["metadata"]["namespace"] == namespace
        return None

    # --- verbs -------------------------------------------------------------------------------

    def serve_verb(self, resource: Resource, verb: str, name: str) -> None:
        plural = resource.plural
        if plural == "selves":
            self.send_json(201, self.self_object(self.decoded(resource)))
        elif plural == "directclusterendpointtokens":
            self.send_json(201, self.endpoint_token(self.decoded(resource)))
        elif verb == "get":
            self.respond_objects(resource, [self.existing(resource, name)])
        elif verb == "list":
            self.list_objects(resource)
        elif verb == "watch":
            self.start_watch(resource)
        elif verb == "create":
            self.run(self.create(resource, self.decoded(resource)))
        elif verb == "update":
            self.run(self.update(resource, name, self.decoded(resource)))
        elif verb == "patch":
            kind, patch = body.decode_patch(self.raw_body(), self.content_type)
            patched = apply_patch(kind, self.existing(resource, name), patch)
            self.run(self.update(resource, name, self.checked(resource, patched, for_create=False)))
        elif verb == "delete":
            self.run(self.delete(resource, name, body.decode_options(self.raw_body(), self.content_type)))
        else:
            raise StatusError(405, f"{verb} is not supported on {plural}")

    def decoded(self, resource: Resource) -> dict[str, Any]:
        return self.checked(resource, body.decode_object(self.raw_body(), self.content_type),
                            for_create=self.info.verb == "create")

    def checked(self, resource: Resource, obj: dict[str, Any], *, for_create: bool) -> dict[str, Any]:
        causes = schema.validate(resource, obj, for_create=for_create)
        if causes:
            unknown = [cause for cause in causes if cause.unknown]
            name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), dict) else None
            if unknown:
                raise StatusError(400, "strict decoding error: " + ", ".join(cause.message for cause in unknown))
            raise invalid(resource, name or "", [cause.as_dict() for cause in causes])
        return obj

    def existing(self, resource: Resource, name: str) -> dict[str, Any]:
        obj = self.api.objects(resource.plural).get(f"{self.info.namespace}/{name}" if resource.namespaced else name)
        visible = self.visible(resource.plural)
        if obj is None or (visible is not None and not visible(obj)):
            raise not_found(resource, name)
        return obj

    def selection(self) -> Selection:
        query = self.query
        return Selection(LabelSelector.parse(query.get("labelSelector")),
                         FieldSelector.parse(query.get("fieldSelector"), ("metadata.name",)))

    def list_objects(self, resource: Resource) -> None:
        admits = self.admits(resource.plural)
        everything = self.api.objects(resource.plural)
        version = self.list_version(resource)
        after, limit = self.page()
        table = schema.table_asked(self.accept())
        if admits is None and not after and not limit and not table:
            self.send(200, self.api.whole_list(resource, version))  # a relist: the same bytes until a change
            return
        candidates: Iterator[dict[str, Any]] = iter(everything.values()) if not after else (
            obj for name, obj in everything.items() if name > after)
        if admits is not None:
            candidates = filter(admits, candidates)
        items = list(islice(candidates, limit) if limit else candidates)
        remaining = sum(1 for _ in candidates) if limit else 0
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if remaining:
            meta["continue"] = _continue_token(version, objects.object_key(items[-1]))
            meta["remainingItemCount"] = remaining
        if table:
            self.send(200, orjson.dumps(schema.table(resource, items, include_object=self.include_object(),
                                                     list_meta=meta)), TABLE_TYPE)
        else:
            self.send(200, orjson.dumps(list_object(resource, items, meta)))

    def admits(self, plural: str) -> Callable[[dict[str, Any]], bool] | None:
        """What a list or watch passes on: the caller's view and the request's selectors (None: all)."""
        visible = self.visible(plural)
        selection = self.selection()
        if not (selection.labels.requirements or selection.fields.requirements):
            return visible
        if visible is None:
            return selection.matches
        return lambda obj: visible(obj) and selection.matches(obj)

    def list_version(self, resource: Resource) -> int:
        if resource.plural == "clusters":
            return self.api.cluster_version
        snapshot = self.api.current()
        return snapshot.activity_version if resource.plural == "namespaceactivities" else snapshot.version

    def page(self) -> tuple[str, int]:
        raw_limit = self.query.get("limit", "") or "0"
        if not raw_limit.isdigit():
            raise StatusError(400, f"limit must be a non-negative integer, not {raw_limit!r}")
        token = self.query.get("continue", "")
        after = ""
        if token:
            try:
                _, after = orjson.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
            except (ValueError, binascii.Error, orjson.JSONDecodeError, TypeError):
                raise StatusError(400, "the continue token is not valid") from None
        return str(after), int(raw_limit)

    def include_object(self) -> str:
        policy = self.query.get("includeObject", "Metadata") or "Metadata"
        if policy not in ("None", "Metadata", "Object"):
            raise StatusError(400, f"includeObject must be one of None, Metadata, Object, not {policy!r}")
        return policy

    def respond_objects(self, resource: Resource, items: list[dict[str, Any]], code: int = 200) -> None:
        if schema.table_asked(self.accept()):
            self.send(code, orjson.dumps(schema.table(resource, items, include_object=self.include_object(),
                                                      list_meta={})), TABLE_TYPE)
        else:
            self.send_json(code, items[0])

    # --- watch -------------------------------------------------------------------------------

    def start_watch(self, resource: Resource) -> None:
        plural = resource.plural
        admits = self.admits(plural)
        table = schema.table_asked(self.accept())
        include = self.include_object()

        def render(obj: dict[str, Any]) -> dict[str, Any]:
            return schema.table(resource, [obj], include_object=include, list_meta={}) if table else obj

        timeout = self.query.get("timeoutSeconds", "")
        since = self.query.get("resourceVersion", "")
        # Checked before the stream opens: afterwards a refusal could only be an ERROR event.
        for name, value in (("timeoutSeconds", timeout), ("resourceVersion", since)):
            if value and not value.isdigit():
                raise StatusError(400, f"{name} must be a non-negative integer, not {value!r}")
        seconds = float(timeout) if timeout and int(timeout) > 0 else WATCH_TIMEOUT
        watch = WatchStream(self.api.events, self, plural, admits or _everything, render,
                            kind=resource.kind, bookmarks=self.query.get("allowWatchBookmarks") in ("true", "1"),
                            timeout=seconds)
        self.watch = watch
        self.begin_stream(200, TABLE_TYPE if table else body.JSON.encode())
        # Clusters and activity have versions of their own: a watch of them starts from what is now.
        if since in ("", "0") or plural in ("clusters", "namespaceactivities"):
            version = self.list_version(resource)
            watch.start(Event(version, "ADDED", plural, obj) for obj in self.api.objects(plural).values())
            return
        replay = self.api.events.since(int(since), plural)
        if replay is None:
            watch.error(_status(410, f"too old resource version: {since} ({self.api.events.oldest})", "Expired"))
            return
        watch.start(replay)

    def buffered(self) -> int:
        return self.client.transport.get_write_buffer_size()

    def on_closed(self) -> None:
        if self.watch is not None:
            self.watch.closed()

    # --- store-backed writes -----------------------------------------------------------------

    async def create(self, resource: Resource, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name") or ""
        if not name:
            prefix = meta.get("generateName") or ""
            if not prefix:
                raise invalid(resource, "", [_cause("FieldValueRequired", "metadata.name", "name or generateName is required")])
            name = prefix + secrets.token_hex(3)[:5]
        plural = resource.plural
        if plural == "ownedaccesskeys":
            await self.create_access_key(resource, name, obj)
            return
        if plural == "virtualclusterinstances":
            await self.create_instance(resource, name, obj)
            return
        changes = objects.spec_changes(obj, objects.USER_SPEC if plural == "users" else objects.TEAM_SPEC)
        password = self.new_password(resource, name, obj)
        if self.dry_run():
            if name in self.api.objects(plural):
                raise already_exists(resource, name)
            self.send_json(201, self.preview(resource, name, changes, None))
        elif plural == "users":
            user = await self.api.write(lambda admin: admin.create_user(name, **changes, **password_fields(password)))
            self.send_json(201, objects.user_object(user, ()))
        else:
            team = await self.api.write(lambda admin: admin.create_team(name, **changes))
            self.send_json(201, objects.team_object(team))

    async def create_access_key(self, resource: Resource, name: str, obj: dict[str, Any]) -> None:
        spec = obj.get("spec") or {}
        if spec.get("key"):
            # Never echoed, not even in the refusal: a secret sent here may be real somewhere else.
            raise invalid(resource, name, [_cause("FieldValueForbidden", "spec.key", "the key is generated by the server")])
        user = self.caller_user()
        if user is None:
            raise StatusError(403, "only users of the state store own access keys; this credential belongs to none")
        if spec.get("user", user.name) != user.name or spec.get("team"):
            raise StatusError(403, f'User "{self.identity.user}" may only create access keys it owns')
        changes = objects.spec_changes(obj, {**objects.KEY_SPEC, **objects.KEY_CREATE_SPEC})
        changes.pop("disabled")
        if changes["type"] not in ("User", "Other"):
            raise invalid(resource, name, [_cause("FieldValueNotSupported", "spec.type",
                                                  'supported values: "User", "Other"')])
        changes["scope"] = self.narrowed(resource, name, changes["scope"], self.caller_scope())
        if self.dry_run():
            if name in self.api.current().access_keys:
                raise already_exists(resource, name)
            fixed = {field: changes.pop(field) for field in ("type", "ttl", "ttl_after_last_activity")}
            draft = AccessKey(name, fixed["type"], user.name, None, b"", ttl=fixed["ttl"],
                              ttl_after_last_activity=fixed["ttl_after_last_activity"], created=time.time())
            self.send_json(201, self.preview(resource, name, changes, draft))
            return
        key, secret = await self.api.write(lambda admin: admin.create_access_key(user=user.name, name=name, **changes))
        created = objects.access_key_object(key)
        created["spec"]["key"] = secret  # the one time it is shown
        self.send_json(201, created)

    # --- virtual cluster instances -------------------------------------------------------------

    def instance_object(self, instance: VirtualClusterInstance) -> dict[str, Any]:
        return objects.instance_object(instance, *self.api.instance_status(instance))

    def instance_fields(self, resource: Resource, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """The store fields a create or update body sets: in the request's namespace, a token never
        kept in kubectl apply's annotation."""
        namespace = self.info.namespace
        if ((obj.get("metadata") or {}).get("namespace") or namespace) != namespace:  # null: absent, as in Go
            raise StatusError(400, "the namespace of the provided object does not match the namespace sent on the request")
        token = (obj.get("spec") or {}).get("token")
        if token and _applied_secret(obj, "token", token):
            raise invalid(resource, name, [_cause(
                "FieldValueForbidden", "metadata.annotations",
                f"{LAST_APPLIED} would keep spec.token in clear: set it with kubectl create, replace or patch")])
        return objects.instance_changes(obj)

    def instance_preview(self, instance: VirtualClusterInstance) -> dict[str, Any]:
        """What a dryRun=All write would store, checked as the store checks it."""
        try:
            check_object_name(instance.namespace, "namespace")
            check_object_name(instance.name, "virtual cluster")
            return self.instance_object(check_instance(instance))
        except StoreError as error:
            raise StatusError(422, str(error)) from None

    async def create_instance(self, resource: Resource, name: str, obj: dict[str, Any]) -> None:
        namespace = self.info.namespace
        fields = self.instance_fields(resource, name, obj)
        if self.dry_run():
            if f"{namespace}/{name}" in self.api.objects(resource.plural):
                raise already_exists(resource, name)
            checked = self.checked_instance_fields(fields)
            self.send_json(201, self.instance_preview(VirtualClusterInstance(
                namespace, name, created=time.time(), **checked)))
            return
        instance = await self.api.write(lambda admin: admin.create_virtual_cluster_instance(namespace, name, **fields))
        self.send_json(201, self.instance_object(instance))

    async def update_instance(self, resource: Resource, name: str, obj: dict[str, Any], expected: int | None) -> None:
        namespace = self.info.namespace
        self.existing(resource, name)
        fields = self.instance_fields(resource, name, obj)
        if self.dry_run():
            current = self.api.current().virtual_cluster_instances.get((namespace, name))
            if current is None:
                raise not_found(resource, name)
            if expected is not None and expected != current.resource_version:
                raise conflict(resource, name)
            self.send_json(200, self.instance_preview(replace(current, **self.checked_instance_fields(fields))))
            return
        instance = await self.api.write(lambda admin: admin.update_virtual_cluster_instance(
            namespace, name, expected_version=expected, **fields))
        self.send_json(200, self.instance_object(instance))

    @staticmethod
    def checked_instance_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return checked_changes(INSTANCE_FIELDS, fields, "virtual cluster instance")
        except StoreError as error:
            raise StatusError(422, str(error)) from None

    async def update(self, resource: Resource, name: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("name", name) != name:
            raise StatusError(400, f'the name of the object ({meta.get("name")}) does not match the name on the URL ({name})')
        expected = _version(meta.get("resourceVersion"))
        plural = resource.plural
        if plural == "virtualclusterinstances":
            await self.update_instance(resource, name, obj, expected)
            return
        current = self.stored(resource, name)
        changes = objects.spec_changes(obj, SPEC_FIELDS[plural])
        password = self.new_password(resource, name, obj)
        if isinstance(current, AccessKey):
            self.check_fixed(resource, name, obj, current)
            changes["scope"] = self.narrowed(resource, name, changes["scope"], current.scope)
        if self.dry_run():
            if expected is not None and expected != current.resource_version:
                raise conflict(resource, name)
            self.send_json(200, self.preview(resource, name, changes, current))
        elif plural == "users":
            user = await self.api.write(lambda admin: admin.update_user(name, expected_version=expected, **changes,
                                                                        **password_fields(password)))
            member_of = objects.teams_of(self.api.current())
            self.send_json(200, objects.user_object(user, member_of.get(name, ())))
        elif plural == "teams":
            team = await self.api.write(lambda admin: admin.update_team(name, expected_version=expected, **changes))
            self.send_json(200, objects.team_object(team))
        else:
            key = await self.api.write(lambda admin: admin.update_access_key(name, expected_version=expected, **changes))
            self.send_json(200, objects.access_key_object(key))

    async def delete(self, resource: Resource, name: str, options: Mapping[str, Any]) -> None:
        self.existing(resource, name)  # what the caller cannot see it cannot delete
        preconditions = options.get("preconditions") or {}
        expected = _version(preconditions.get("resourceVersion"))
        # kubectl sends a delete's dryRun in the DeleteOptions body, other clients in the query.
        dry_run = options.get("dryRun") or []
        if not isinstance(dry_run, list) or any(value != "All" for value in dry_run):
            raise StatusError(400, f'dryRun must be ["All"], not {dry_run!r}')
        if self.dry_run() or dry_run:
            self.send_json(200, self.existing(resource, name))
            return
        namespace = self.info.namespace
        deleter: Callable[[StateAdmin], Any] = {
            "users": lambda admin: admin.delete_user(name, expected_version=expected),
            "teams": lambda admin: admin.delete_team(name, expected_version=expected),
            "ownedaccesskeys": lambda admin: admin.delete_access_key(name, expected_version=expected),
            "virtualclusterinstances": lambda admin: admin.delete_virtual_cluster_instance(
                namespace, name, expected_version=expected),
        }[resource.plural]
        deleted = await self.api.write(deleter)
        rendered = {"users": lambda: objects.user_object(deleted, ()), "teams": lambda: objects.team_object(deleted),
                    "ownedaccesskeys": lambda: objects.access_key_object(deleted),
                    "virtualclusterinstances": lambda: self.instance_object(deleted)}[resource.plural]()
        self.send_json(200, rendered)

    def new_password(self, resource: Resource, name: str, obj: dict[str, Any]) -> str | None:
        """The password a user's create or update sets (None: none, or it stays as it is); checked here,
        hashed on the management thread, never echoed."""
        if resource.plural != "users":
            return None
        password = (obj.get("spec") or {}).get("password")
        if password and _applied_secret(obj, "password", password):
            raise invalid(resource, name, [_cause(
                "FieldValueForbidden", "metadata.annotations",
                f"{LAST_APPLIED} would keep spec.password in clear: set it with kubectl create, replace or patch, "
                "or fastproxy user set-password")])
        if password in (None, ""):
            return password
        try:
            return check_password_text(password)
        except PasswordError as error:
            raise invalid(resource, name, [_cause("FieldValueInvalid", "spec.password", str(error))]) from None

    def check_fixed(self, resource: Resource, name: str, obj: dict[str, Any], key: AccessKey) -> None:
        """An update may not change what an access key was created as: its owner, type and lifetime."""
        spec = obj.get("spec") or {}
        fixed = {"user": key.user, "team": key.team, "type": key.type, "ttl": key.ttl,
                 "ttlAfterLastActivity": key.ttl_after_last_activity}
        changed = [field for field, value in fixed.items() if field in spec and spec[field] != value]
        if changed:
            raise invalid(resource, name, [_cause("FieldValueForbidden", f"spec.{field}", "field is immutable")
                                           for field in changed])

    def dry_run(self) -> bool:
        value = self.query.get("dryRun", "")
        if value not in ("", "All"):
            raise StatusError(400, f'dryRun must be "All", not {value!r}')
        return value == "All"

    def stored(self, resource: Resource, name: str) -> User | Team | AccessKey:
        """The store's object behind a name the caller may see (404 otherwise)."""
        self.existing(resource, name)
        snapshot = self.api.current()
        found: User | Team | AccessKey | None
        if resource.plural == "users":
            found = snapshot.users.get(name)
        elif resource.plural == "teams":
            found = snapshot.teams.get(name)
        else:
            found = snapshot.access_keys.get(name)
        if found is None:
            raise not_found(resource, name)
        return found

    def preview(self, resource: Resource, name: str, changes: dict[str, Any],
                current: User | Team | AccessKey | None) -> dict[str, Any]:
        """What a write would store (dryRun=All), checked as the store checks it, never written."""
        plural = resource.plural
        try:
            check_object_name(name, resource.singular)
            if plural == "users":
                checked = user_changes(name, changes)
                user = replace(current, **checked) if isinstance(current, User) else User(name, created=time.time(), **checked)
                return objects.user_object(user, objects.teams_of(self.api.current()).get(name, ()))
            if plural == "teams":
                checked = checked_changes(TEAM_FIELDS, changes, "team")
                team = replace(current, **checked) if isinstance(current, Team) else Team(name, created=time.time(), **checked)
                return objects.team_object(team)
            assert isinstance(current, AccessKey)
            return objects.access_key_object(replace(current, **checked_changes(ACCESS_KEY_FIELDS, changes, "access key")))
        except StoreError as error:
            raise StatusError(422, str(error)) from None

    # --- scopes ------------------------------------------------------------------------------

    def caller_scope(self) -> dict[str, Any] | None:
        scope = self.identity.scope
        return None if scope is None else scope.source.to_dict()

    def narrowed(self, resource: Resource, name: str, asked: Any, limit: dict[str, Any] | None) -> dict[str, Any] | None:
        """The scope to give a new key or token: what was asked for if `limit` covers it (None: the
        limit itself), else 403. A scoped credential can never mint a wider one."""
        if asked is None:
            return limit
        try:
            wanted = parse_scope(asked).to_dict()
        except ScopeError as error:
            raise invalid(resource, name, [_cause("FieldValueInvalid", "spec.scope", str(error))]) from None
        if limit is not None and not covers(limit, wanted):
            raise StatusError(403, "the requested scope is wider than the scope of the credential making the request")
        return wanted

    # --- selves, tokens, whoami --------------------------------------------------------------

    def self_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        identity = self.identity
        asked = (obj.get("spec") or {}).get("accessKey") or ""
        status: dict[str, Any] = {"subject": identity.user, "groups": list(identity.groups),
                                  "instanceID": self.api.instance_id,
                                  "projectNamespacePrefix": DEFAULT_PROJECT_NAMESPACE_PREFIX}
        snapshot = self.api.snapshot
        key = self.caller_key()
        if asked:
            snapshot = self.api.current()
            key = snapshot.access_keys.get(asked)
            own = self.caller_user()
            if key is None or not (self.is_admin() or (own is not None and key.user == own.name)):
                raise StatusError(404, f'access key "{asked}" not found')
            status.update(self.key_identity(key, snapshot))
        if key is not None:
            status.update({"accessKey": key.name, "accessKeyType": key.type})
            if key.scope is not None:
                status["accessKeyScope"] = key.scope
        else:
            status.update({"accessKey": identity.source, "accessKeyType": "Other" if identity.source.startswith("token:")
                           else "User"})
            if identity.scope is not None:
                status["accessKeyScope"] = identity.scope.source.to_dict()
        user = snapshot.users.get(key.user) if key is not None and key.user and snapshot is not None else None
        if user is not None and snapshot is not None:
            status["user"] = {"name": user.name, "username": user.username, "displayName": user.display_name,
                              "email": user.email, "subject": user.subject or user.name}
            status["uid"] = user.uid
            status["teams"] = [{"name": team.name, "displayName": team.display_name}
                               for team in sorted(snapshot.teams.values(), key=lambda team: team.name)
                               if user.name in team.members]
        else:
            status["user"] = {"name": identity.user, "username": identity.user, "subject": identity.user}
        return {"apiVersion": objects.API_VERSION, "kind": "Self", "metadata": {"creationTimestamp": None},
                "spec": {"accessKey": asked} if asked else {}, "status": status}

    def key_identity(self, key: AccessKey, snapshot: Snapshot) -> dict[str, Any]:
        owner = snapshot.users.get(key.user) if key.user else None
        if owner is None:
            return {"subject": f"loft:team:{key.team}", "groups": []}
        teams = [team for team in snapshot.teams.values() if owner.name in team.members]
        return {"subject": owner.subject or owner.name, "groups": user_groups(owner, teams)}

    def endpoint_token(self, obj: dict[str, Any]) -> dict[str, Any]:
        keyset, tokens = self.api.keyset, self.api.config.tokens
        resource = schema.resource("directclusterendpointtokens")
        assert resource is not None
        if keyset is None or tokens is None:
            raise StatusError(503, "this gateway does not issue tokens: it has no [tokens] signing_keys_dir")
        spec = obj.get("spec") or {}
        ttl = spec.get("ttl") or min(DEFAULT_TOKEN_TTL, keyset.max_token_lifetime)
        if not 0 < ttl <= keyset.max_token_lifetime:
            raise invalid(resource, "", [_cause("FieldValueInvalid", "spec.ttl",
                                                f"must be between 1 and {keyset.max_token_lifetime} seconds")])
        scope = self.narrowed(resource, "", spec.get("scope"), self.caller_scope())
        identity = self.identity
        audiences = token_audiences(scope, [upstream.cluster.name for upstream in self.api.clusters])
        token = issue_token(keyset, issuer=tokens.issuer, subject=identity.user, audience=audiences,
                            groups=identity.groups, scope=scope, ttl=int(ttl))
        return {"apiVersion": objects.API_VERSION, "kind": "DirectClusterEndpointToken",
                "metadata": {"creationTimestamp": None}, "spec": {"ttl": int(ttl), **({"scope": scope} if scope else {})},
                "status": {"token": token}}

    def self_subject_review(self) -> dict[str, Any]:
        identity = self.identity
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
                "metadata": {"creationTimestamp": None},
                "status": {"userInfo": {"username": identity.user, "groups": list(identity.groups)}}}


TABLE_TYPE = b"application/json;as=Table;v=v1;g=meta.k8s.io"
# What an update of each store-backed resource may set.
SPEC_FIELDS: dict[str, Mapping[str, tuple[str, Any]]] = {
    "users": objects.USER_SPEC, "teams": objects.TEAM_SPEC, "ownedaccesskeys": objects.KEY_SPEC}


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _applied_secret(obj: Mapping[str, Any], field: str, secret: Any) -> bool:
    """Whether kubectl apply's record of the object (an annotation, kept and shown) holds spec.`field`."""
    applied = ((obj.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if not isinstance(applied, str):
        return False
    try:
        recorded = orjson.loads(applied)
    except orjson.JSONDecodeError:
        return isinstance(secret, str) and secret in applied
    return isinstance(recorded, dict) and field in (recorded.get("spec") or {})


def password_fields(password: str | None) -> dict[str, Any]:
    """The store fields that set `password` (None: none; "": remove it); on the management thread, as hashing blocks."""
    if password is None:
        return {}
    return {"password_hash": hash_password(password) if password else ""}


def list_object(resource: Resource, items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": objects.API_VERSION, "kind": resource.list_kind, "metadata": meta, "items": items}


def _everything(obj: dict[str, Any]) -> bool:
    return True


def token_audiences(scope: Mapping[str, Any] | None, clusters: list[str]) -> list[str]:
    """The clusters a Direct Cluster Endpoint token is for: those its scope names, else all."""
    named = [entry.get("cluster", "") for entry in (scope or {}).get("clusters", [])]
    if not named or "*" in named:
        return sorted(clusters)
    return sorted(set(named))


def _version(raw: Any) -> int | None:
    if raw in (None, ""):
        return None
    if not isinstance(raw, str) or not raw.isdigit():
        raise StatusError(400, f"resourceVersion {raw!r} is not valid")
    return int(raw)


def _continue_token(version: int, after: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([version, after])).rstrip(b"=").decode()


def _cause(kind: str, field: str, message: str) -> dict[str, str]:
    return {"reason": kind, "field": field, "message": message}


def _status(code: int, message: str, reason: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason, "code": code}
    if details:
        status["details"] = details
    return status


def already_exists(resource: Resource, name: str) -> StatusError:
    return StatusError(409, f'{resource.plural}.{GROUP} "{name}" already exists', reason="AlreadyExists",
                       details={"name": name, "group": GROUP, "kind": resource.plural})


def conflict(resource: Resource, name: str) -> StatusError:
    return StatusError(409, f'Operation cannot be fulfilled on {resource.plural}.{GROUP} "{name}": the object has been '
                            "modified; please apply your changes to the latest version and try again", reason="Conflict",
                       details={"name": name, "group": GROUP, "kind": resource.plural})


def not_found(resource: Resource, name: str) -> StatusError:
    return StatusError(404, f'{resource.plural}.{GROUP} "{name}" not found',
                       details={"name": name, "group": GROUP, "kind": resource.plural})


def invalid(resource: Resource, name: str, causes: list[dict[str, str]]) -> StatusError:
    summary = ", ".join(f"{cause['field']}: {cause['message']}" for cause in causes)
    return StatusError(422, f'{resource.kind}.{GROUP} "{name}" is invalid: {summary}',
                       details={"name": name, "group": GROUP, "kind": resource.kind, "causes": causes})
