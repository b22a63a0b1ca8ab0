"""The `/grafana/CLUSTER/` handler: the cluster proxy's machinery with another plan and head rewrite.

Requests are planned as the cluster proxy plans them (one scan of the client's headers, the same
framing, streaming, upgrades and pools), towards the cluster's Grafana instead of its API server:
the caller's key or token must reach the cluster; Grafana gets the caller's name and groups in
its auth-proxy headers and neither the client's credential nor any Impersonate-* header. The
prefix is taken off the path; response heads come back with `Location` and cookies under it.
"""
from __future__ import annotations

import asyncio

from .. import headers as hdrs
from ..auth.credentials import Authenticator
from ..auth.scopes import reaches_cluster
from ..clusters import ClusterRegistry
from ..config import ServerConfig
from ..context import Observers, RequestContext
from ..exchange import Connection
from ..proxy import ClusterProxy, ProxyExchange, ProxyPlan, forwarding_plan, requested_upgrade
from ..status import StatusError
from ..upstream import UpstreamConnection
from .config import GrafanaConfig
from .rewrite import auth_proxy_lines, from_own_site, grafana_request_headers, rewrite_response_head

# Requests a page of another site may make with the visitor's cookies without changing anything.
_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))


class GrafanaProxy(ClusterProxy):
    """One per worker; its registry holds each cluster's Grafana under the cluster's name."""

    def __init__(self, config: GrafanaConfig, server: ServerConfig, authenticator: Authenticator,
                 loop: asyncio.AbstractEventLoop):
        super().__init__(server, ClusterRegistry(loop, config.servers), authenticator, loop)
        self.user_header = config.user_header.encode()
        self.groups_header = config.groups_header.encode()
        self.forged = frozenset((self.user_header.lower(), self.groups_header.lower()))
        self.cookie = config.access_key_cookie.encode()
        self.origins = {server.name: f"{server.scheme}://{server.authority}".lower().encode() for server in config.servers}

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                  keep_alive: bool) -> GrafanaExchange:
        return GrafanaExchange(client, ctx, observers, keep_alive, self, self.plan(ctx))

    def plan(self, ctx: RequestContext) -> ProxyPlan:
        """What goes to the cluster's Grafana, or StatusError; fills in ctx.identity."""
        head, cluster = ctx.head, ctx.route.cluster
        found = hdrs.scan_client_headers(head.headers)
        upgrade = requested_upgrade(head, found)
        kept, cookie_key = grafana_request_headers(found.kept, self.forged, self.cookie)
        # A browser holds its key in the cookie; an explicit bearer credential goes first.
        if cookie_key is not None and found.authorization is None and found.bearer_subprotocol is None:
            if (upgrade is not None or head.method not in _SAFE_METHODS) and not from_own_site(head.headers):
                raise StatusError(403, "a request authenticated by cookie that changes something or opens a "
                                       "WebSocket must come from this gateway's own pages (Origin)")
            credential = cookie_key
        else:
            credential = hdrs.bearer_credential(found, upgrade)
        identity = ctx.identity = self.authenticator.authenticate(credential, cluster)
        if identity.scope is not None and not reaches_cluster(identity.scope, cluster):
            raise StatusError(403, f'the access key\'s scope does not reach cluster "{cluster}"')
        upstream = self.clusters.get(cluster)
        if upstream is None:
            raise StatusError(404, f'cluster "{cluster}" has no Grafana')
        caller = auth_proxy_lines(self.user_header, identity.user, self.groups_header, identity.groups)
        return forwarding_plan(ctx, found, kept, identity, upstream, caller, upgrade, self.server.max_body_bytes)


class GrafanaExchange(ProxyExchange):
    """A ProxyExchange whose response heads are rewritten under `/grafana/CLUSTER`."""

    __slots__ = ()

    def _rewrite(self, conn: UpstreamConnection) -> None:
        proxy = self.proxy
        assert isinstance(proxy, GrafanaProxy)
        cluster = self.ctx.route.cluster
        conn.head = rewrite_response_head(conn.head, b"/grafana/" + cluster.encode(), proxy.origins[cluster], proxy.cookie)

    def upstream_head(self, conn: UpstreamConnection, body: memoryview | None) -> None:
        self._rewrite(conn)
        super().upstream_head(conn, body)

    def upstream_switched(self, conn: UpstreamConnection, early: memoryview) -> None:
        self._rewrite(conn)
        super().upstream_switched(conn, early)

    def upstream_unreachable(self, message: str) -> None:
        super().upstream_unreachable("the Grafana of " + message)  # 'cluster "NAME" is unreachable: why'

    def timed_out(self) -> None:
        server = self.plan.upstream.cluster
        self.fail(504, f'the Grafana of cluster "{server.name}" did not answer within {server.response_header_timeout:g}s')
