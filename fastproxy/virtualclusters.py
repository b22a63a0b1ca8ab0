"""Virtual clusters: /kubernetes/virtualcluster/CLUSTER/NAMESPACE/NAME/ is the cluster proxy with
another upstream and path.

Every request is first checked on the host cluster: a SubjectAccessReview, for the caller, asks
whether it may `get` `virtualclusters` in API group `storage.loft.sh` in the host namespace
(allowed answers kept ALLOWED_TTL seconds, denials DENIED_TTL). Then it goes to the virtual
cluster's API server exactly as the cluster proxy sends a request (the caller's impersonation,
streaming, upgrades, nested impersonation reviewed on the virtual cluster): at its own URL, or
through the host cluster's service proxy over the host's pool and credential.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from typing import cast

from . import headers as hdrs
from .auth.credentials import Authenticator
from .auth.identity import Identity
from .auth.impersonation import AccessReviewer, Check
from .auth.requestinfo import is_discovery
from .auth.scopes import check_scope, reaches_virtual_cluster
from .clusters import ClusterRegistry, Upstream
from .config import ServerConfig, VirtualClusterConfig
from .context import Observers, RequestContext
from .exchange import Connection
from .proxy import ClusterProxy, ProxyExchange, ProxyPlan, requested_upgrade
from .routing import Route
from .status import StatusError
from .upstream_client import UpstreamRequestError

ACCESS_GROUP = "storage.loft.sh"
ACCESS_RESOURCE = "virtualclusters"
ALLOWED_TTL = 10.0  # seconds an allowed host review is reused
DENIED_TTL = 2.0    # ...and a denied one: a new RoleBinding takes effect soon


def access_check(namespace: str, name: str) -> Check:
    """The permission a caller needs on the host cluster to use virtual cluster `name`."""
    return Check(ACCESS_GROUP, ACCESS_RESOURCE, "", namespace, name, verb="get")


def service_proxy_path(namespace: str, name: str) -> str:
    """Where the host cluster's API server proxies to the virtual cluster's service."""
    return f"/api/v1/namespaces/{namespace}/services/https:{name}:443/proxy"


def access_refusal(answer: asyncio.Future, host: str, identity: Identity, route: Route) -> StatusError | None:
    """None when the host's answer allows the request; else the Status to refuse it with (closed:
    an answer the host could not give refuses too)."""
    error = answer.exception()
    if isinstance(error, UpstreamRequestError):
        return StatusError(error.code, f"access to virtual cluster {route.namespace}/{route.virtual_cluster} "
                                       f"cannot be checked on cluster {host!r}: {error.message}")
    if error is not None:
        return StatusError(403, f"access to virtual cluster {route.namespace}/{route.virtual_cluster} "
                                f"cannot be checked on cluster {host!r}: {error}")
    allowed, reason = answer.result()
    if allowed:
        return None
    return StatusError(403, f'{ACCESS_RESOURCE}.{ACCESS_GROUP} "{route.virtual_cluster}" is forbidden: '
                            f'User "{identity.user}" cannot get resource "{ACCESS_RESOURCE}" in API group '
                            f'"{ACCESS_GROUP}" in the namespace "{route.namespace}" on cluster {host!r}'
                            + (f": {reason}" if reason else ""))


class ServiceProxyUpstream(Upstream):
    """A virtual cluster behind its host's service proxy: the host's pool, Host and credential,
    every path below `path_prefix`. Rebuilt when the host's handle or credential changes."""

    def __init__(self, host: Upstream, config: VirtualClusterConfig):  # no super(): nothing of its own to open
        self.host = host
        self.cluster = dataclasses.replace(host.cluster, name=config.key)
        self.pool = host.pool
        self.host_line = host.host_line
        self.credential = host.credential
        self.path_prefix = service_proxy_path(config.namespace, config.name)


class VirtualClusters:
    """(cluster, namespace, name) -> the virtual cluster's upstream; those with a URL have pools
    of their own, the others share their host's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hosts: ClusterRegistry,
                 configs: Iterable[VirtualClusterConfig] = ()):
        self.hosts = hosts
        self.direct = ClusterRegistry(loop)
        self.configs: dict[tuple[str, str, str], VirtualClusterConfig] = {}
        self._via_host: dict[str, ServiceProxyUpstream] = {}
        for config in configs:
            self.put(config)

    def put(self, config: VirtualClusterConfig, direct: Upstream | None = None) -> None:
        """Serve `config`; `direct`: its own server's handle, prebuilt (else made from config.server)."""
        self.remove(config)
        self.configs[(config.cluster, config.namespace, config.name)] = config
        if direct is not None:
            self.direct.adopt(direct)
        elif config.server is not None:
            self.direct.put(config.server)

    def remove(self, config: VirtualClusterConfig) -> None:
        old = self.configs.pop((config.cluster, config.namespace, config.name), None)
        if old is not None:
            self.direct.remove(old.key)
            self._via_host.pop(old.key, None)

    def upstream(self, cluster: str, namespace: str, name: str) -> Upstream | None:
        config = self.configs.get((cluster, namespace, name))
        if config is None:
            return None
        if config.server is not None:
            return self.direct.get(config.key)
        host = self.hosts.get(cluster)
        if host is None:
            return None
        via = self._via_host.get(config.key)
        if via is None or via.host is not host or via.credential is not host.credential:
            via = self._via_host[config.key] = ServiceProxyUpstream(host, config)
        return via

    def tick(self) -> None:
        self.direct.tick()

    def close(self) -> None:
        self.direct.close()


class VirtualClusterProxy(ClusterProxy):
    """The handler of /kubernetes/virtualcluster/CLUSTER/NAMESPACE/NAME/."""

    def __init__(self, server: ServerConfig, clusters: ClusterRegistry, authenticator: Authenticator,
                 loop: asyncio.AbstractEventLoop, virtual_clusters: VirtualClusters):
        super().__init__(server, clusters, authenticator, loop)
        self.watches = None  # no shared streams: every watch must pass the host's review first
        self.virtual_clusters = virtual_clusters
        self.access = AccessReviewer(ALLOWED_TTL, denied_ttl=DENIED_TTL)

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                  keep_alive: bool) -> ProxyExchange:
        return VirtualClusterExchange(client, ctx, observers, keep_alive, self, self.plan(ctx))

    def plan(self, ctx: RequestContext) -> ProxyPlan:
        """As ClusterProxy.plan, for the request target VirtualCluster; the host review comes after."""
        head, where = ctx.head, ctx.route
        found = ctx.found = hdrs.scan_client_headers(head.headers)
        upgrade = requested_upgrade(head, found)
        identity = ctx.identity = self.authenticator.authenticate(hdrs.bearer_credential(found, upgrade), where.cluster)
        cluster, namespace, name = where.cluster, where.namespace, where.virtual_cluster
        if identity.scope is not None:
            info = ctx.info
            if not (is_discovery(info) and reaches_virtual_cluster(identity.scope, cluster, name, namespace)):
                denial = check_scope(identity.scope, info, "VirtualCluster", cluster, virtual_cluster=name,
                                     vcluster_namespace=namespace)
                if denial is not None:
                    raise StatusError(403, denial)
        upstream = self.virtual_clusters.upstream(cluster, namespace, name)
        if upstream is None:
            raise StatusError(404, f'virtual cluster "{namespace}/{name}" not found on cluster "{cluster}"')
        return self.relay_plan(ctx, found, upgrade, identity, upstream, upstream.path_prefix + where.path)

    def review_access(self, plan: ProxyPlan, route: Route, done: Callable[[StatusError | None], None]) -> None:
        """Ask the host whether plan.identity may use the virtual cluster; `done` gets the refusal
        or None, at once when the answer is cached."""
        host = self.clusters.get(route.cluster)
        if host is None:
            done(StatusError(404, f'cluster "{route.cluster}" not found'))
            return
        answer = self.access.answer(host, plan.identity, access_check(route.namespace, route.virtual_cluster))
        if answer.done() and not answer.cancelled():
            done(access_refusal(answer, route.cluster, plan.identity, route))
            return

        def answered(answer: asyncio.Future) -> None:
            if not answer.cancelled():  # cancelled: shutting down
                done(access_refusal(answer, route.cluster, plan.identity, route))
        answer.add_done_callback(answered)


class VirtualClusterExchange(ProxyExchange):
    """A ProxyExchange that waits for the host's review before it goes on as any other."""

    __slots__ = ()

    def serve(self) -> None:
        cast(VirtualClusterProxy, self.proxy).review_access(self.plan, self.ctx.route, self.access_reviewed)

    def access_reviewed(self, refusal: StatusError | None) -> None:
        if self.finished:
            return  # the client left meanwhile
        if refusal is not None:
            # A client still holding back its body (Expect) cannot go on with this connection.
            self.refuse(refusal, close=self.plan.expect_continue and not self.request_done)
        else:
            super().serve()
