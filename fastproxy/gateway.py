"""Per-worker gateway state and the router: request head -> context -> handler -> responder."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from .auth.credentials import Authenticator
from .clusters import ClusterRegistry
from .config import Config
from .context import Observer, Observers, RequestContext, RequestHead
from .exchange import Connection, Responder
from .local import Health
from .management.api import ManagementAPI
from .observe.activity import ActivityObserver
from .observe.audit import AuditObserver
from .observe.metrics import CountedReviewer, Metrics
from .proxy import ClusterProxy
from .routing import CLUSTER, HEALTH, MANAGEMENT, METRICS, NOT_SERVED, UI, route
from .status import StatusError, status_response
from .ui.page import StatusPage

# A handler: builds the responder for one request, or raises StatusError to refuse it.
Handler = Callable[[Connection, RequestContext, Observers, bool], Responder]


class Gateway:
    """Everything one worker needs to answer requests; pools are usable from any handler."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, observers: Sequence[Observer] = (),
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
        self.observers = Observers([*observers, *(observer for observer in (self.metrics, self.activity, self.audit)
                                                  if observer is not None)])
        self.proxy = ClusterProxy(config.server, self.clusters, self.authenticator, loop)
        self.management = ManagementAPI(config, self.authenticator, self.clusters, loop, audit=self.audit)
        # The router table's kinds -> handlers; a kind without one answers 404 (routing.NOT_SERVED).
        self.handlers: dict[str, Handler] = {CLUSTER: self.proxy.responder, MANAGEMENT: self.management.responder,
                                             HEALTH: Health}
        if self.metrics is not None:
            self.handlers[METRICS] = self.metrics.responder
            self.proxy.reviewer = CountedReviewer(self.metrics.impersonation)
        # The status page ([ui]): its handler, its observer of denials, its samples on the tick.
        self.status_page = (StatusPage(config, self.authenticator, self.management.probe, self.metrics, metrics_share)
                            if config.ui.enabled else None)
        if self.status_page is not None:
            self.handlers[UI] = self.status_page.responder
            self.observers.add(self.status_page.denials)
        self.connections: set = set()  # open client connections, for deadlines and shutdown

    def start(self) -> None:
        """Begin the background work: keeping the state store's snapshot fresh, probing clusters."""
        self.authenticator.start(self.loop)
        self.management.start()

    def responder(self, client: Connection, head: RequestHead, keep_alive: bool) -> Responder:
        """Route a request to its handler; a refusal becomes a responder with a Status to give."""
        observers = self.observers
        ctx = RequestContext(head, time.monotonic() if observers.active else 0.0)
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
            responder.canned = status_response(err.code, err.message, close=close, reason=err.reason, details=err.details)
            ctx.message = err.message
        if observers.active:
            observers.start(ctx)
        return responder

    def tick(self) -> None:
        """Once a second or so: expire idle upstream connections, pick up rotated tokens,
        write batched key and namespace activity, re-read changed revocation lists, share the
        metrics, write the audit log's ResponseStarted events, sample the status page's rates."""
        self.clusters.tick()
        self.authenticator.tick()
        self.management.tick()
        if self.metrics is not None:
            self.metrics.tick()
        if self.activity is not None:
            self.activity.tick()
        if self.audit is not None:
            self.audit.tick()
        if self.status_page is not None:
            self.status_page.tick()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.activity is not None:
            self.activity.flush()  # written by the reader's close below
        self.management.close()
        self.clusters.close()
        self.authenticator.close()
        if self.audit is not None:
            self.audit.close()
