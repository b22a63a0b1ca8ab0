"""The devcluster's HTTPS API: authentication, authorisation, then one dispatcher over the
request's attributes (discovery, CRUD, watch, pod logs and streams, access reviews)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from fastproxy.kube import patch
from fastproxy.kube.selectors import FieldSelector, LabelSelector, Selection
from fastproxy.status import StatusError

from . import discovery, errors, protobuf
from .auth import (
    ADMIN_USER,
    GATEWAY_USER,
    MASTERS,
    Attributes,
    Authenticator,
    Authorizer,
    Identity,
    Rule,
    authenticated,
    impersonate,
    is_true_flag,
    request_attributes,
)
from .certs import Credentials, ensure_credentials, read_token
from .discovery import PODS, ResourceType
from .logs import serve_log
from .seed import run_activity, seed_store
from .services import is_service_proxy, serve_service_proxy
from .store import Store
from .tables import table, wants_table

log = logging.getLogger("devcluster")

MAX_BODY_BYTES = 3 * 1024 * 1024
DEFAULT_WATCH_SECONDS = 1800
BOOKMARK_INTERVAL = 2.0
STREAM_SUBRESOURCES = ("exec", "attach", "portforward")
_HEALTH_PATHS = ("/healthz", "/livez", "/readyz")
# The SubjectAccessReviews this cluster answered (their specs, the latest REVIEWS_KEPT), for tests.
REVIEWS_PATH = "/devcluster/subjectaccessreviews"
REVIEWS_KEPT = 1000


@dataclass
class Cluster:
    store: Store
    authenticator: Authenticator
    authorizer: Authorizer
    services: dict[tuple[str, str], Path] = field(default_factory=dict)  # --service backends
    reviews: list[dict[str, Any]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


CLUSTER = web.AppKey("cluster", Cluster)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def status_response(error: errors.ApiError) -> web.Response:
    return json_response(error.status(), error.code)


@web.middleware
async def api_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ApiError as error:
        return status_response(error)
    except StatusError as error:  # from the shared conventions (fastproxy.kube)
        return status_response(errors.ApiError(error.code, error.message, reason=error.reason))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path_qs)
        return status_response(errors.ApiError(500, "an internal error occurred"))


async def dispatch(request: web.Request) -> web.StreamResponse:
    cluster = request.app[CLUSTER]
    transport = request.transport
    identity = cluster.authenticator.authenticate(
        request.headers.get("Authorization"), transport.get_extra_info("peercert") if transport else None)
    attrs = request_attributes(request.method, request.rel_url.raw_path, request.query)
    if is_service_proxy(attrs):
        # Authorised as the caller itself: its Impersonate-* headers are for the service (services.py).
        cluster.authorizer.check(identity, attrs)
        return await serve_service_proxy(request, cluster.services, attrs)
    identity = impersonate(request.headers, identity, cluster.authorizer)
    cluster.authorizer.check(identity, attrs)
    if attrs.path == REVIEWS_PATH and request.method == "GET":
        return json_response(cluster.reviews)
    if not attrs.is_resource:
        return serve_non_resource(request, attrs)
    rt = discovery.find_resource(attrs.api_group, attrs.api_version, attrs.resource)
    # A cluster-scoped resource has no namespace in its path, except a namespace's own.
    if rt is None or (attrs.namespace and not rt.namespaced
                      and (rt is not discovery.NAMESPACES or attrs.namespace != attrs.name)):
        raise _no_such_path()
    if attrs.subresource:
        return await serve_subresource(request, cluster, rt, attrs)
    if not rt.stored:
        if attrs.verb != "create":
            raise _method_not_allowed()
        return await serve_review(request, cluster, rt, identity)
    return await serve_stored(request, cluster, rt, attrs)


def _no_such_path() -> errors.ApiError:
    return errors.ApiError(404, "the server could not find the requested resource")


def _method_not_allowed() -> errors.ApiError:
    return errors.ApiError(405, "the server does not allow this method on the requested resource")


# Discovery and other non-resource paths

def serve_non_resource(request: web.Request, attrs: Attributes) -> web.Response:
    path = attrs.path.rstrip("/") or "/"
    if path in _HEALTH_PATHS:
        return web.Response(text="ok")
    parts = path.strip("/").split("/")
    if path == "/version":
        doc = discovery.version_info()
    elif path == "/api":
        doc = discovery.api_versions(request.host)
    elif path == "/apis":
        doc = discovery.api_group_list()
    elif len(parts) == 2 and parts[0] == "api":
        doc = discovery.api_resource_list("", parts[1])
    elif len(parts) == 2 and parts[0] == "apis":
        doc = discovery.api_group(parts[1])
    elif len(parts) == 3 and parts[0] == "apis":
        doc = discovery.api_resource_list(parts[1], parts[2])
    elif path == "/openapi/v3":
        doc = discovery.openapi_v3_index()
    elif parts[:2] == ["openapi", "v3"] and len(parts) in (4, 5):
        group, version = (parts[3], parts[4]) if parts[2] == "apis" and len(parts) == 5 else ("", parts[3])
        doc = discovery.openapi_v3_document(group, version) if parts[2] in ("api", "apis") else None
    else:
        doc = None
    if doc is None:
        raise _no_such_path()
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed()
    return json_response(doc)


# Stored resources

async def serve_stored(request: web.Request, cluster: Cluster, rt: ResourceType,
                       attrs: Attributes) -> web.StreamResponse:
    store, query = cluster.store, request.query
    namespace = attrs.namespace if rt.namespaced else ""
    # A namespaced resource asked for across namespaces (/api/v1/pods) is listed or watched in all.
    scope = namespace if rt.namespaced and namespace else None
    if query.get("dryRun"):
        raise errors.bad_request("dryRun is not supported by the devcluster")
    verb, name = attrs.verb, attrs.name
    if verb == "list":
        page = store.list(rt, scope, _selection(rt, query), _limit(query), query.get("continue"))
        return _list_response(request, rt, page)
    if verb == "watch":
        # A name comes from a legacy /watch/.../NAME path or a metadata.name field selector.
        return await serve_watch(request, cluster, rt, scope, _selection(rt, query, name))
    if verb == "create" and not name and (namespace or not rt.namespaced):
        return json_response(store.create(rt, namespace, await _read_body(request)), 201)
    if verb == "deletecollection" and scope is not None and verb in rt.verbs:
        removed = store.delete_collection(rt, scope, _selection(rt, query))
        return json_response(_list_document(rt, removed, store.resource_version))
    if not name:
        raise _method_not_allowed()
    if verb == "get":
        obj = store.get(rt, namespace, name)
        if wants_table(request.headers.get("Accept", "")):
            return json_response(table(rt, [obj], include_object=_include_object(query)))
        return json_response(obj)
    if verb == "update":
        return json_response(store.update(rt, namespace, name, await _read_body(request)))
    if verb == "patch":
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in patch.SUPPORTED:
            raise patch.unsupported_media_type()
        current = store.get(rt, namespace, name)
        patched = patch.apply_patch(content_type, current, await _read_body(request, patch_body=True))
        return json_response(store.update(rt, namespace, name, patched))
    if verb == "delete":
        options = await _read_body(request, optional=True)
        return json_response(store.delete(rt, namespace, name, options.get("preconditions") or {}))
    raise _method_not_allowed()


def _selection(rt: ResourceType, query, name: str = "") -> Selection:
    fields = ("metadata.name", "metadata.namespace", *rt.extra_fields)
    field_selector = query.get("fieldSelector", "")
    if name:
        field_selector = ",".join(filter(None, [field_selector, f"metadata.name={name}"]))
    return Selection(LabelSelector.parse(query.get("labelSelector")),
                     FieldSelector.parse(field_selector, fields))


def _limit(query) -> int:
    raw = query.get("limit", "0") or "0"
    if not raw.isdigit():
        raise errors.bad_request(f"limit must be a non-negative integer, not {raw!r}")
    return int(raw)


def _include_object(query) -> str:
    policy = query.get("includeObject", "Metadata")
    if policy not in ("None", "Metadata", "Object"):
        raise errors.bad_request(f"includeObject must be one of None, Metadata, Object, not {policy!r}")
    return policy


async def _read_body(request: web.Request, *, patch_body: bool = False, optional: bool = False) -> Any:
    """The request's object, from JSON or kubectl's protobuf; a PATCH body may be any JSON value."""
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    if content_type == protobuf.MEDIA_TYPE and not patch_body:
        return protobuf.decode(raw)
    if not patch_body and content_type not in ("application/json", ""):
        raise errors.ApiError(415, f"the body of the request was in an unknown format ({content_type}) "
                                   f"- accepted media types include: application/json, {protobuf.MEDIA_TYPE}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_request(f"the request body is not valid JSON: {exc}") from None
    if not patch_body and not isinstance(body, dict):
        raise errors.bad_request("the request body must be a JSON object")
    return body


def _list_document(rt: ResourceType, items: list[dict], version: int, token: str | None = None,
                   remaining: int | None = None) -> dict[str, Any]:
    return {"kind": rt.list_kind, "apiVersion": rt.api_version,
            "metadata": _list_metadata(version, token, remaining), "items": items}


def _list_metadata(version: int, token: str | None, remaining: int | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"resourceVersion": str(version)}
    if token:
        metadata["continue"] = token
    if remaining is not None:
        metadata["remainingItemCount"] = remaining
    return metadata


def _list_response(request: web.Request, rt: ResourceType, page) -> web.Response:
    if wants_table(request.headers.get("Accept", "")):
        return json_response(table(rt, page.items, include_object=_include_object(request.query),
                                   list_metadata=_list_metadata(page.resource_version, page.continue_token,
                                                                page.remaining)))
    return json_response(_list_document(rt, page.items, page.resource_version, page.continue_token,
                                         page.remaining))


# Watch

def _watch_since(query) -> int | None:
    raw = query.get("resourceVersion", "")
    if raw in ("", "0"):
        return None
    if not raw.isdigit():
        raise errors.bad_request(f"invalid resourceVersion {raw!r}: must be an integer")
    return int(raw)


def _watch_timeout(query) -> float:
    raw = query.get("timeoutSeconds")
    if raw is None:
        return DEFAULT_WATCH_SECONDS
    if not raw.isdigit():
        raise errors.bad_request(f"timeoutSeconds must be a non-negative integer, not {raw!r}")
    return int(raw)


async def serve_watch(request: web.Request, cluster: Cluster, rt: ResourceType, namespace: str | None,
                      selection: Selection) -> web.StreamResponse:
    query = request.query
    timeout, since = _watch_timeout(query), _watch_since(query)
    as_table = wants_table(request.headers.get("Accept", ""))
    include_object = _include_object(query)
    bookmarks = is_true_flag(query.get("allowWatchBookmarks"))
    response = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "Cache-Control": "no-cache, private"})
    response.enable_chunked_encoding()
    await response.prepare(request)

    async def send(event_type: str, obj: dict[str, Any]) -> None:
        if as_table and event_type in ("ADDED", "MODIFIED", "DELETED"):
            obj = table(rt, [obj], include_object=include_object)
        await response.write(orjson.dumps({"type": event_type, "object": obj}) + b"\n")

    try:
        watcher = cluster.store.watch(rt, namespace, selection, since)
    except errors.ApiError as error:
        # As the API server does: the stream opens, then reports the expired version.
        await send("ERROR", error.status())
        return response
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    next_bookmark = loop.time() + BOOKMARK_INTERVAL if bookmarks else float("inf")
    try:
        while not watcher.closed:
            now = loop.time()
            if now >= deadline:
                break
            if now >= next_bookmark:
                next_bookmark = now + BOOKMARK_INTERVAL
                if watcher.idle:  # every change up to the store's version has been sent
                    version = str(cluster.store.resource_version)
                    await send("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version,
                                            "metadata": {"resourceVersion": version}})
                continue
            event = await watcher.next_event(min(deadline, next_bookmark) - now)
            if event is not None:
                await send(*event)
    except ConnectionResetError:
        pass
    finally:
        cluster.store.stop_watch(watcher)
    return response


# Subresources: logs and streams

async def serve_subresource(request: web.Request, cluster: Cluster, rt: ResourceType,
                            attrs: Attributes) -> web.StreamResponse:
    sub = rt.subresource(attrs.subresource)
    if sub is None or not attrs.name:
        raise _no_such_path()
    if attrs.verb not in sub.verbs:
        raise _method_not_allowed()
    pod = cluster.store.get(rt, attrs.namespace, attrs.name)
    if rt is PODS and sub.name == "log":
        try:
            return await serve_log(request, pod, cluster.stopping)
        except ConnectionResetError:
            return web.Response()
    if rt is PODS and sub.name in STREAM_SUBRESOURCES:
        from . import streams  # written separately; imported on use so the rest works without it
        handler = {"exec": streams.handle_exec, "attach": streams.handle_attach,
                   "portforward": streams.handle_portforward}[sub.name]
        return await handler(request, pod)
    raise _no_such_path()


# Reviews

async def serve_review(request: web.Request, cluster: Cluster, rt: ResourceType,
                       identity: Identity) -> web.Response:
    review = await _read_body(request)
    if review.get("kind", rt.kind) != rt.kind:
        raise errors.bad_request(f"expected a {rt.kind}, got {review.get('kind')}")
    spec = review.get("spec") or {}
    if not isinstance(spec, dict):
        raise errors.bad_request("spec must be a JSON object")
    if rt is discovery.SELF_SUBJECT_REVIEWS:
        status = {"userInfo": identity.user_info()}
    elif rt is discovery.SELF_SUBJECT_ACCESS_REVIEWS:
        status = _access_review_status(cluster.authorizer, identity, rt, spec)
    else:
        if not spec.get("user") and not spec.get("groups"):
            raise errors.invalid(rt.kind, "", "spec.user: Invalid value: \"\": at least one of user or "
                                 "group must be specified", rt.group)
        extra = {key: tuple(values) for key, values in (spec.get("extra") or {}).items()}
        subject = Identity(str(spec.get("user", "")), tuple(spec.get("groups") or ()),
                           str(spec.get("uid", "")), extra)
        status = _access_review_status(cluster.authorizer, subject, rt, spec)
        cluster.reviews.append(spec)
        del cluster.reviews[:-REVIEWS_KEPT]
    return json_response({"kind": rt.kind, "apiVersion": rt.api_version,
                          "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}, 201)


def _access_review_status(authorizer: Authorizer, subject: Identity, rt: ResourceType,
                          spec: dict[str, Any]) -> dict[str, Any]:
    resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if bool(resource) == bool(non_resource) or not isinstance(resource or non_resource, dict):
        raise errors.invalid(rt.kind, "", "spec: Invalid value: exactly one of nonResourceAttributes "
                             "or resourceAttributes must be specified", rt.group)
    if resource:
        attrs = Attributes(verb=_text(resource, "verb"), is_resource=True, api_group=_text(resource, "group"),
                           api_version=_text(resource, "version"), resource=_text(resource, "resource"),
                           subresource=_text(resource, "subresource"),
                           namespace=_text(resource, "namespace"), name=_text(resource, "name"))
    else:
        attrs = Attributes(verb=_text(non_resource, "verb"), path=_text(non_resource, "path"))
    if authorizer.allows(subject, attrs):
        return {"allowed": True, "reason": "allowed by devcluster rules"}
    return {"allowed": False}


def _text(attributes: dict[str, Any], key: str) -> str:
    return str(attributes.get(key) or "")


# Application and process

def build_app(cluster: Cluster) -> web.Application:
    app = web.Application(middlewares=[api_errors], client_max_size=MAX_BODY_BYTES)
    app[CLUSTER] = cluster
    app.router.add_route("*", "/{path:.*}", dispatch)
    return app


@dataclass(frozen=True)
class Options:
    directory: Path
    host: str = "127.0.0.1"
    port: int = 0
    rules: list[Rule] = field(default_factory=list)
    token_file_identities: dict[str, Identity] = field(default_factory=dict)
    activity_rate: float = 0.0
    seed: bool = True
    watch_history: int = 1000
    services: dict[tuple[str, str], Path] = field(default_factory=dict)


def _tls_context(creds: Credentials) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(creds.server_cert_file, creds.server_key_file)
    # A client certificate is optional; one signed by the CA identifies its holder.
    context.load_verify_locations(creds.ca_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _write_ready(directory: Path, ready: dict[str, Any]) -> None:
    tmp = directory / "ready.json.tmp"
    tmp.write_text(json.dumps(ready))
    os.replace(tmp, directory / "ready.json")


async def serve(options: Options) -> None:
    directory = options.directory
    (directory / "ready.json").unlink(missing_ok=True)
    creds = ensure_credentials(directory)
    tokens = {
        read_token(creds.admin_token_file): authenticated(ADMIN_USER, [MASTERS]),
        read_token(creds.gateway_token_file): authenticated(GATEWAY_USER),
        **options.token_file_identities,
    }
    store = Store(options.watch_history)
    if options.seed:
        seed_store(store)
    cluster = Cluster(store, Authenticator(tokens), Authorizer(options.rules), options.services)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, cluster.stopping.set)

    runner = web.AppRunner(build_app(cluster), shutdown_timeout=0.5,
                           access_log_format='%a "%r" %s %b %Tfs')
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, ssl_context=_tls_context(creds))
    await site.start()
    host, port = runner.addresses[0][:2]
    url_host = f"[{host}]" if ":" in host else host
    ready = {
        "url": f"https://{url_host}:{port}",
        "ca_file": str(creds.ca_file),
        "gateway_token_file": str(creds.gateway_token_file),
        "admin_token_file": str(creds.admin_token_file),
        "gateway_cert_file": str(creds.gateway_cert_file),
        "gateway_key_file": str(creds.gateway_key_file),
        "pid": os.getpid(),
    }
    _write_ready(directory, ready)
    print(json.dumps(ready), flush=True)

    activity = asyncio.create_task(run_activity(store, options.activity_rate, cluster.stopping)) \
        if options.activity_rate > 0 else None
    await cluster.stopping.wait()
    if activity is not None:
        activity.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await activity
    store.close_all_watches()
    await runner.cleanup()
    (directory / "ready.json").unlink(missing_ok=True)
    print("devcluster stopped", file=sys.stderr, flush=True)
