"""Per-worker gateway state and the pure-ish request plan: route, authenticate, rewrite."""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from . import headers as hdrs
from .auth.credentials import Authenticator
from .auth.identity import Identity
from .auth.impersonation import ImpersonationReviewer, NestedIdentity, parse_impersonation
from .auth.requestinfo import request_info
from .auth.scopes import check_scope
from .config import Config, ClusterConfig
from .routing import CLUSTER, Route, route
from .status import StatusError
from .upstream import Pool, ResumingContext

log = logging.getLogger("fastproxy.gateway")

_NO_BODY_METHODS = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS"))
_LONG_RUNNING_PARAMS = frozenset(("watch", "follow"))
_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(slots=True)
class RequestHead:
    """A parsed client request head, as plain data."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    client_ip: bytes
    upgrade: bool = False


@dataclass(slots=True)
class Plan:
    """What to do with a request the gateway accepted."""

    method: bytes
    route: Route
    identity: Identity | None = None
    upstream: Upstream | None = None
    head: bytes = b""           # the upstream request head
    chunked: bool = False       # the request body is chunked (re-framed by the gateway)
    upgrade: bool = False
    long_running: bool = False  # watch / follow: no response-head timeout
    expect_continue: bool = False
    nested: NestedIdentity | None = None  # asked-for impersonation the cluster must allow first


class Upstream:
    """One cluster as this worker reaches it: the pool plus prebuilt header lines."""

    def __init__(self, cluster: ClusterConfig, pool: Pool):
        self.cluster = cluster
        self.pool = pool
        self.host_line = b"Host: " + cluster.authority.encode() + b"\r\n"
        self.credential = b""
        self._token_mtime = 0.0
        self.refresh_credential()

    def refresh_credential(self) -> None:
        """Re-read the token file when it changed (projected service-account tokens rotate)."""
        path = self.cluster.token_file
        if path is None:
            return
        try:
            mtime = os.stat(path).st_mtime
            if mtime == self._token_mtime:
                return
            with open(path, "rb") as f:
                token = f.read().strip()
        except OSError as exc:
            log.error("cluster %s: cannot read token_file: %s", self.cluster.name, exc)
            return
        if not token or any(c in token for c in b"\r\n\0"):
            log.error("cluster %s: token_file %s holds no usable token", self.cluster.name, path)
            return
        self._token_mtime = mtime
        self.credential = b"Authorization: Bearer " + token + b"\r\n"


def upstream_ssl_context(cluster: ClusterConfig) -> ResumingContext | None:
    if cluster.scheme != "https":
        return None
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    if cluster.ca_file:
        context.load_verify_locations(cluster.ca_file)
    else:
        context.load_default_certs()
    context.set_alpn_protocols(["http/1.1"])  # upgrades (exec, port-forward) need HTTP/1.1
    if cluster.insecure_skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cluster.client_cert_file:
        context.load_cert_chain(cluster.client_cert_file, cluster.client_key_file)
    return context


class Gateway:
    """Everything one worker needs to answer requests; pools are usable from any handler."""

    def __init__(self, config: Config, loop):
        self.config = config
        self.loop = loop
        self.upstreams = {
            cluster.name: Upstream(cluster, Pool(loop, cluster, upstream_ssl_context(cluster)))
            for cluster in config.clusters
        }
        self.authenticator = Authenticator(config)
        self.reviewer = ImpersonationReviewer()
        self.reviews: set[asyncio.Task] = set()  # running impersonation reviews, kept from collection
        self.connections: set = set()  # open client connections, for deadlines and shutdown

    def start(self) -> None:
        """Begin the background work: keeping the state store's snapshot fresh."""
        self.authenticator.start(self.loop)

    def plan(self, head: RequestHead) -> Plan:
        """Decide what happens to a request, or raise StatusError. No I/O."""
        method = head.method
        if method == b"CONNECT":
            raise StatusError(405, "CONNECT is not supported", close=True)
        target = head.target.decode("latin-1")
        where = route(target)
        if where.kind != CLUSTER:
            return Plan(method, where)
        found = hdrs.scan_client_headers(head.headers)
        upgrade = None
        if head.upgrade:
            if found.upgrade is None or found.upgrade.lower() not in hdrs.UPGRADE_PROTOCOLS:
                raise StatusError(400, "only SPDY/3.1 and websocket upgrades are supported", close=True)
            upgrade = found.upgrade
        identity = self.authenticator.authenticate(bearer_credential(found, upgrade), where.cluster)
        if identity.scope is not None:
            denial = check_scope(identity.scope, request_info(method.decode("latin-1"), where.path, where.query),
                                 "Cluster", where.cluster)
            if denial is not None:
                raise StatusError(403, denial)
        upstream = self.upstreams.get(where.cluster)
        if upstream is None:
            raise StatusError(404, f'cluster "{where.cluster}" not found')
        if found.impersonation is None:
            nested, impersonation = None, identity.impersonation
        else:
            nested = parse_impersonation(found.impersonation)
            impersonation = nested.headers()  # sent only once the cluster allows it
        content_length = found.content_length
        limit = self.config.server.max_body_bytes
        if limit and content_length is not None and content_length > limit:
            raise StatusError(413, f"request body larger than {limit} bytes", close=True)
        if found.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif content_length is not None:
            framing = b"Content-Length: %d\r\n" % content_length
        elif method not in _NO_BODY_METHODS:
            framing = b"Content-Length: 0\r\n"
        else:
            framing = b""
        upstream_target = where.path + "?" + where.query if where.query else where.path
        version = b"1.0" if head.version == b"1.0" else b"1.1"
        forwarded_for = head.client_ip if found.forwarded_for is None else found.forwarded_for + b", " + head.client_ip
        return Plan(
            method, where, identity, upstream,
            head=hdrs.upstream_request_head(
                method, upstream_target.encode("latin-1"), version, found.kept,
                host=upstream.host_line, credential=upstream.credential,
                impersonation=impersonation, forwarded_for=forwarded_for,
                framing=framing, upgrade=upgrade),
            chunked=found.chunked,
            upgrade=upgrade is not None,
            long_running=is_long_running(where.query),
            expect_continue=found.expect_continue and version == b"1.1",
            nested=nested,
        )

    def review_impersonation(self, plan: Plan, done: Callable[[StatusError | None], None]) -> None:
        """Ask the cluster whether plan.identity may act as plan.nested; `done` gets the refusal or None."""
        review = self.loop.create_task(self.reviewer.refusal(plan.upstream, plan.identity, plan.nested))
        self.reviews.add(review)

        def reviewed(task: asyncio.Task) -> None:
            self.reviews.discard(task)
            if task.cancelled():
                return  # shutting down
            try:
                refusal = task.result()
            except Exception:
                log.exception("cluster %s: impersonation review failed", plan.route.cluster)
                refusal = StatusError(500, "impersonation could not be checked")
            done(refusal)
        review.add_done_callback(reviewed)

    def tick(self) -> None:
        """Once a second or so: expire idle upstream connections, pick up rotated tokens,
        write batched key activity, re-read changed revocation lists."""
        for upstream in self.upstreams.values():
            upstream.pool.expire_idle()
            upstream.refresh_credential()
        self.authenticator.tick()

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.pool.close()
        self.authenticator.close()


def bearer_credential(found: hdrs.ClientHeaders, upgrade: bytes | None) -> bytes:
    """The key or token the client presents: `Authorization: Bearer`, or for a WebSocket without
    one, the bearer token subprotocol (browsers cannot set headers on a WebSocket)."""
    authorization = found.authorization
    if authorization is None:
        encoded = found.bearer_subprotocol
        if encoded is None or upgrade is None or upgrade.lower() != b"websocket":
            raise StatusError(401, "Unauthorized: a bearer access key is required")
        # Checked first: the decoder would skip characters outside the alphabet.
        if encoded.translate(None, _BASE64URL) or len(encoded) % 4 == 1:
            raise StatusError(401, "Unauthorized: the bearer token subprotocol is not base64url")
        token = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        if not token:
            raise StatusError(401, "Unauthorized: the bearer token subprotocol is empty")
        return token
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise StatusError(401, "Unauthorized: the Authorization header must be 'Bearer <access key>'")
    return token


def is_long_running(query: str) -> bool:
    """Watches and followed logs stream for as long as the upstream likes."""
    if "watch" not in query and "follow" not in query:
        return False
    return any(name in _LONG_RUNNING_PARAMS and value.lower() not in ("0", "false")
               for name, value in parse_qsl(query, keep_blank_values=True))
