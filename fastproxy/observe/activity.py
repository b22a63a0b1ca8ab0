"""Sleep-mode activity: which namespaces of which clusters requests reached, and when last.

An observer: at each request's finish it notes the request's cluster and namespace (the host
namespace, for a virtual cluster) with who did what, keeping only the latest per namespace, and
every FLUSH_INTERVAL hands the batch to the state store's reader, which writes it off the event
loop. The management API serves what is stored as `namespaceactivities`.
"""
from __future__ import annotations

import time

from ..config import ActivityConfig
from ..context import RequestContext
from ..routing import CLUSTER, VIRTUAL_CLUSTER
from ..store import NamespaceActivity, StateReader

FLUSH_INTERVAL = 5.0  # seconds between batched writes: activity is kept at that resolution
EVERY_REQUEST = ActivityConfig()  # the default: every request the gateway served counts


class ActivityObserver:
    """Notes the namespace activity of finished requests and writes it in batches."""

    def __init__(self, reader: StateReader, config: ActivityConfig = EVERY_REQUEST):
        self.reader = reader
        self.config = config
        self.pending: dict[tuple[str, str], NamespaceActivity] = {}
        self.flushed = time.monotonic()

    def start(self, ctx: RequestContext) -> None:
        pass

    def finish(self, ctx: RequestContext) -> None:
        route, identity = ctx.route, ctx.identity
        if route is None or identity is None or route.kind not in (CLUSTER, VIRTUAL_CLUSTER):
            return
        if not (ctx.status == 101 or 200 <= ctx.status < 400):  # refusals and failures are no activity
            return
        info = ctx.info
        if info is None:
            return
        namespace = route.namespace if route.kind == VIRTUAL_CLUSTER else info.namespace
        if not namespace or info.verb in self.config.ignore_verbs or identity.user in self.config.ignore_users:
            return
        self.pending[(route.cluster, namespace)] = NamespaceActivity(
            route.cluster, namespace, time.time(), identity.user, info.verb, info.api_group, info.resource,
            info.subresource, info.name, route.virtual_cluster)

    def tick(self) -> None:
        """Once a second: hand the batch over every FLUSH_INTERVAL."""
        if self.pending and time.monotonic() - self.flushed >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, {}
        self.flushed = time.monotonic()
        self.reader.record_namespace_activity(batch)
