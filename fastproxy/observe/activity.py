"""Sleep-mode activity: which namespaces of which clusters requests reached, and when last.

An observer: at each request's finish it notes the request's cluster and namespace (the host
namespace, for a virtual cluster) with who did what, keeping only the latest per namespace, and
every FLUSH_INTERVAL hands the batch to the state store's reader, which writes it off the event
loop. The management API serves what is stored as `namespaceactivities`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import ConfigError
from ..context import RequestContext
from ..routing import CLUSTER, VIRTUAL_CLUSTER
from ..store import NamespaceActivity, StateReader

FLUSH_INTERVAL = 5.0  # seconds between batched writes: activity is kept at that resolution


@dataclass(frozen=True, slots=True)
class ActivityConfig:
    """`[activity]`: which requests count (requests the gateway refused never do)."""

    enabled: bool = True
    ignore_verbs: frozenset[str] = frozenset()   # e.g. "watch": an open watch is not someone at work
    ignore_users: frozenset[str] = frozenset()   # e.g. a monitoring robot's subject


def parse_activity_config(data: object) -> ActivityConfig:
    """The `[activity]` table; ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError("activity: must be a table")
    unknown = sorted(set(data) - {"enabled", "ignore_verbs", "ignore_users"})
    if unknown:
        raise ConfigError(f"activity.{unknown[0]}: unknown key")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("activity.enabled: must be true or false")
    lists = {}
    for key in ("ignore_verbs", "ignore_users"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"activity.{key}: must be a list of non-empty strings")
        lists[key] = frozenset(value)
    return ActivityConfig(enabled, lists["ignore_verbs"], lists["ignore_users"])


class ActivityObserver:
    """Notes the namespace activity of finished requests and writes it in batches."""

    def __init__(self, reader: StateReader, config: ActivityConfig = ActivityConfig()):
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
