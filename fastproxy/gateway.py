"""Per-worker gateway state and the router: request head -> context -> handler -> responder."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .auth.credentials import Authenticator, StaticKeys
from .clusters import ClusterRegistry
from .config import Config
from .context import FLUSH_INTERVAL, BatchObserver, Observer, Observers, RequestContext, RequestHead, RequestIds
from .exchange import Connection, Responder
from .grafana.proxy import GrafanaProxy
from .limits import Admission
from .local import READY, HealthChecks
from .login import AuthEndpoints
from .management.api import ManagementAPI
from .observe.accesslog import AccessLog
from .observe.activity import ActivityObserver
from .observe.audit import AuditObserver
from .observe.metrics import CountedReviewer, Metrics
from .proxy import ClusterProxy
from .routing import AUTH, CLUSTER, GRAFANA, HEALTH, MANAGEMENT, METRICS, NOT_SERVED, OIDC, UI, VIRTUAL_CLUSTER, route
from .status import StatusError, status_response
from .ui.page import StatusPage
from .vcinstances import InstanceFollower

if TYPE_CHECKING:
    from .oidc.endpoints import OidcEndpoints
from .virtualclusters import VirtualClusterProxy, VirtualClusters

# A handler: builds the responder for one request, or raises StatusError to refuse it.
Handler = Callable[[Connection, RequestContext, Observers, bool], Responder]


class Gateway:
    """Everything one worker needs to answer requests; pools are usable from any handler."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, observers: Sequence[Observer | BatchObserver] = (),
                 metrics_share: str | None = None):
        self.config = config
        self.loop = loop
        self.clusters = ClusterRegistry(loop, config.clusters)
        self.authenticator = Authenticator(config)
        # Metrics: an observer like any other, unless disabled ([metrics]); `metrics_share` is
        # the folder where the workers add up their numbers (server.py, workers > 1).
        self.metrics = (Metrics(config, self.clusters, self.authenticator, metrics_share)
                        if config.metrics.enabled else None)
        # Sleep-mode activity needs the state store to keep it; the audit log is on with [audit].
        store = self.authenticator.store
        self.activity = (ActivityObserver(store.reader, config.activity)
                         if store is not None and config.activity.enabled else None)
        self.audit = AuditObserver(config.audit) if config.audit is not None else None
        self.access_log = AccessLog(config.access_log) if config.access_log is not None else None
        # While a log records requests, each gets an id: X-Request-Id, the access log's id, the auditID.
        self.request_ids = RequestIds() if self.access_log is not None or self.audit is not None else None
        self.observers = Observers([*observers, *(observer for observer in (self.metrics, self.activity, self.audit,
                                                                            self.access_log) if observer is not None)])
        self.proxy = ClusterProxy(config.server, self.clusters, self.authenticator, loop)
        self.virtual_clusters = VirtualClusters(loop, self.clusters, config.virtual_clusters)
        self.vcluster_proxy = VirtualClusterProxy(config.server, self.clusters, self.authenticator, loop,
                                                  self.virtual_clusters)
        self.management = ManagementAPI(config, self.authenticator, self.clusters, loop, audit=self.audit)
        self.health = HealthChecks()
        # Configuration, keys and clusters were loaded before a Gateway exists; what can fail later:
        self.health.add(READY, "keys", lambda: "the state store cannot be read" if store is not None
                        and store.reader.failing else None)
        self.health.add(READY, "clusters", lambda: None if len(self.clusters) == len(self.config.clusters)
                        else "the cluster list is not loaded")
        self.login = AuthEndpoints(config, self.authenticator, self.clusters, self.management.write,
                                   self.management.keyset)
        # The router table's kinds -> handlers; a kind without one answers 404 (routing.NOT_SERVED).
        self.handlers: dict[str, Handler] = {CLUSTER: self.proxy.responder, MANAGEMENT: self.management.responder,
                                             VIRTUAL_CLUSTER: self.vcluster_proxy.responder, AUTH: self.login.responder,
                                             HEALTH: self.health.responder}
        if self.metrics is not None:
            self.handlers[METRICS] = self.metrics.responder
            self.metrics.logs = {name: log.writer for name, log in (("audit", self.audit), ("access", self.access_log))
                                 if log is not None}
            self.proxy.reviewer = CountedReviewer(self.metrics.impersonation)
            self.vcluster_proxy.reviewer = self.proxy.reviewer
            self.proxy.joiner_outcomes = self.metrics.joiner_reviews
        limits = config.limits
        if limits is not None and limits.per_request:  # otherwise the cluster route costs nothing more
            admission = Admission(limits, self.proxy, self.vcluster_proxy)
            self.handlers[CLUSTER] = admission.responder
            self.handlers[VIRTUAL_CLUSTER] = admission.virtual_cluster_responder
            if self.metrics is not None:
                admission.refused = self.metrics.limited
        self.grafana: GrafanaProxy | None = None
        if config.grafana is not None:
            self.grafana = GrafanaProxy(config.grafana, config.server, self.authenticator, loop)
            self.handlers[GRAFANA] = self.grafana.responder
        # The status page ([ui]): its handler, its observer of denials, its samples on the tick.
        self.status_page = (StatusPage(config, self.authenticator, self.management.probe, self.metrics, metrics_share,
                                       self.login)
                            if config.ui.enabled else None)
        if self.status_page is not None:
            self.handlers[UI] = self.status_page.responder
            self.observers.add(self.status_page.denials)
        self.oidc: OidcEndpoints | None = None
        if config.oidc is not None and self.management.keyset is not None and self.management.admin is not None:
            from .oidc.endpoints import OidcEndpoints  # authlib loads only where /oidc/ is served
            self.oidc = OidcEndpoints(config.oidc, self.management.keyset, self.management.admin, self.login)
            self.handlers[OIDC] = self.oidc.responder
        self.connections: set = set()  # open client connections, for deadlines and shutdown
        if store is not None:  # the virtual clusters admins create in the management API
            InstanceFollower(loop, self.virtual_clusters, config.virtual_clusters, self.connections,
                             lambda: self.config.server.watch_termination_period).subscribe(store.reader)

    def start(self) -> None:
        """Begin the background work: keeping the state store's snapshot fresh, probing clusters,
        handing the batched observers their requests."""
        self.authenticator.start(self.loop)
        self.management.start()
        if self.observers.batched:
            self.loop.call_later(FLUSH_INTERVAL, self._flush_observers)

    def _flush_observers(self) -> None:
        self.observers.flush()
        self.loop.call_later(FLUSH_INTERVAL, self._flush_observers)

    def reload(self, config: Config) -> list[str]:
        """New requests use `config`'s clusters (all reconnected: their certificates and tokens are
        read again), access keys and server limits; requests open keep what they have. Returns
        the names of the clusters removed."""
        self.config = config
        self.authenticator.static = StaticKeys(config)
        self.proxy.server = config.server
        return self.clusters.sync(config.clusters, renew=True)

    def responder(self, client: Connection, head: RequestHead, keep_alive: bool) -> Responder:
        """Route a request to its handler; a refusal becomes a responder with a Status to give."""
        observers = self.observers
        ctx = RequestContext(head, time.monotonic() if observers.active else 0.0)
        ids = self.request_ids
        if ids is not None:  # RequestIds.assign, inlined: it runs for every request
            ctx.id_line = ids.lines.pop() if ids.lines else ids()
        try:
            if head.method == b"CONNECT":
                raise StatusError(405, "CONNECT is not supported", close=True)
            where = ctx.route = route(head.target.decode("latin-1"))
            handler = self.handlers.get(where.kind)
            if handler is None:
                raise StatusError(404, NOT_SERVED[where.kind])
            responder = handler(client, ctx, observers, keep_alive)
        except StatusError as err:
            # A refused request whose body the client may hold back (Expect) must end the connection.
            close = err.close or not keep_alive or any(n.lower() == b"expect" for n, _ in head.headers)
            responder = Responder(client, ctx, observers, not close)
            responder.canned = status_response(err.code, err.message, close=close, reason=err.reason, details=err.details,
                                               extra=err.headers + ctx.id_line)
            ctx.message = err.message
        if observers.active:
            observers.start(ctx)
        return responder

    def tick(self) -> None:
        """Once a second or so: expire idle upstream connections, pick up rotated tokens,
        write batched key and namespace activity, re-read changed revocation lists, share the
        metrics, write the audit log's ResponseStarted events, sample the status page's rates."""
        self.clusters.tick()
        self.virtual_clusters.tick()
        if self.grafana is not None:
            self.grafana.clusters.tick()
        self.authenticator.tick()
        self.management.tick()
        self.login.tick()
        self.observers.flush()  # before the metrics are shared
        if self.metrics is not None:
            self.metrics.tick()
        if self.activity is not None:
            self.activity.tick()
        if self.audit is not None:
            self.audit.tick()
        if self.status_page is not None:
            self.status_page.tick()

    def close(self) -> None:
        self.observers.flush()
        if self.metrics is not None:
            self.metrics.close()
        if self.activity is not None:
            self.activity.flush()  # written by the reader's close below
        self.management.close()
        self.login.close()
        if self.oidc is not None:
            self.oidc.close()
        self.clusters.close()
        self.virtual_clusters.close()
        if self.grafana is not None:
            self.grafana.clusters.close()
        self.authenticator.close()
        if self.audit is not None:
            self.audit.close()
        if self.access_log is not None:
            self.access_log.close()
