"""Limits per identity and per cluster (`[limits]`): the API server's priority and fairness, in small.

Each worker counts what every identity (the user a credential resolves to) holds open on the
cluster and virtual-cluster proxies together: requests (neither watches nor tunnels), watches
and followed logs, and tunnels (exec, attach, port-forward); and the requests in flight to each
cluster (a virtual cluster is one of its own). A request past a
limit is refused with 429 and `Retry-After`, and counted by which limit it met (metrics:
`fastproxy_limited_requests_total{limit}`). So one client holding many slow requests cannot
take a worker's share of a cluster from the others. Without a `[limits]` table none of this
runs: the cluster route keeps the plain ClusterProxy handler.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import _Table
from .context import Observers, RequestContext
from .exchange import Connection, Responder
from .proxy import ClusterProxy, ProxyExchange, ProxyPlan
from .status import StatusError
from .virtualclusters import VirtualClusterExchange, VirtualClusterProxy
from .watchstream import WatchSubscriber, watch_subscriber


class Kind(enum.IntEnum):
    REQUEST = 0  # answered and done: neither a watch nor a tunnel
    WATCH = 1    # a watch or a followed log
    TUNNEL = 2   # an upgrade: exec, attach, port-forward


# The metric's `limit` label: which limit refused a request.
IDENTITY_REQUESTS, CLUSTER_REQUESTS, IDENTITY_WATCHES, IDENTITY_TUNNELS = LIMITS = (
    "identity_requests", "cluster_requests", "identity_watches", "identity_tunnels")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Each limit is per worker; 0: no limit."""

    requests_per_identity: int = 0
    requests_per_cluster: int = 0
    watches_per_identity: int = 0
    tunnels_per_identity: int = 0
    connections_per_worker: int = 0  # client connections; past it a worker stops accepting for a while
    retry_after: int = 1             # seconds, as the 429 tells the client

    @property
    def per_request(self) -> bool:
        """Some limit is checked for each request on the cluster proxy."""
        return bool(self.requests_per_identity or self.requests_per_cluster or self.watches_per_identity
                    or self.tunnels_per_identity)


def parse_limits_config(data: object) -> LimitsConfig | None:
    """`[limits]`, None when it sets no limit."""
    t = _Table(data, "limits")
    counts = {key: t.positive(key, int, 0, allow_zero=True)
              for key in ("requests_per_identity", "requests_per_cluster", "watches_per_identity",
                          "tunnels_per_identity", "connections_per_worker")}
    config = LimitsConfig(**counts, retry_after=t.positive("retry_after", int, 1))
    t.finish()
    return config if any(counts.values()) else None


def kind_of(plan: ProxyPlan) -> Kind:
    return Kind.TUNNEL if plan.upgrade else Kind.WATCH if plan.long_running else Kind.REQUEST


def limit_reached(config: LimitsConfig, kind: Kind, identity_holds: int, cluster_holds: int) -> str | None:
    """The LIMITS entry that refuses one more request of `kind`, when the identity already holds
    `identity_holds` of that kind and its cluster `cluster_holds` requests; None: admitted."""
    if kind is Kind.REQUEST:
        if config.requests_per_identity and identity_holds >= config.requests_per_identity:
            return IDENTITY_REQUESTS
        if config.requests_per_cluster and cluster_holds >= config.requests_per_cluster:
            return CLUSTER_REQUESTS
        return None
    if kind is Kind.WATCH:
        return IDENTITY_WATCHES if config.watches_per_identity and identity_holds >= config.watches_per_identity else None
    return IDENTITY_TUNNELS if config.tunnels_per_identity and identity_holds >= config.tunnels_per_identity else None


_WHAT = {IDENTITY_REQUESTS: ("requests in flight", "requests_per_identity"),
         CLUSTER_REQUESTS: ("requests in flight to this cluster", "requests_per_cluster"),
         IDENTITY_WATCHES: ("watches open", "watches_per_identity"),
         IDENTITY_TUNNELS: ("exec, attach and port-forward sessions open", "tunnels_per_identity")}


def refusal(config: LimitsConfig, limit: str) -> StatusError:
    """The 429 for a request `limit` refused (the message names the limit, never the user)."""
    what, key = _WHAT[limit]
    seconds = config.retry_after
    return StatusError(429, f"too many {what} (limits.{key} = {getattr(config, key)}); retry after {seconds}s",
                       details={"retryAfterSeconds": seconds}, headers=b"Retry-After: %d\r\n" % seconds)


class Admission:
    """The cluster route's handler while `[limits]` sets a per-request limit: ClusterProxy.plan,
    then the counts; a LimitedExchange (or, for a watch served from a shared upstream stream, a
    LimitedSubscriber: each subscriber counts as the watch it is) gives its place back when it
    ends, however it ends."""

    def __init__(self, config: LimitsConfig, proxy: ClusterProxy, virtual_clusters: VirtualClusterProxy | None = None):
        self.config = config
        self.proxy = proxy
        self.virtual_clusters = virtual_clusters
        self.held: tuple[dict[str, int], ...] = ({}, {}, {})  # by Kind: user -> open
        self.clusters: dict[str, int] = {}  # cluster name -> requests (Kind.REQUEST) in flight
        self.refused = dict.fromkeys(LIMITS, 0)  # shared with the metrics when they are on

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                  keep_alive: bool) -> Responder:
        """The cluster route's."""
        return self._admit(self.proxy, LimitedExchange, client, ctx, observers, keep_alive)

    def virtual_cluster_responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                                  keep_alive: bool) -> Responder:
        """The virtual-cluster route's: the same counts per identity, and per virtual cluster its own
        (its upstream's name is CLUSTER/NAMESPACE/NAME); counted before the host's access review."""
        assert self.virtual_clusters is not None
        return self._admit(self.virtual_clusters, LimitedVirtualClusterExchange, client, ctx, observers, keep_alive)

    def _admit(self, proxy: ClusterProxy, exchange_class: type[LimitedExchange], client: Connection,
               ctx: RequestContext, observers: Observers, keep_alive: bool) -> Responder:
        plan = proxy.plan(ctx)
        kind = kind_of(plan)
        user, cluster = plan.identity.user, plan.upstream.cluster.name
        held = self.held[kind]
        holds = held.get(user, 0)
        cluster_holds = self.clusters.get(cluster, 0) if kind is Kind.REQUEST else 0
        limit = limit_reached(self.config, kind, holds, cluster_holds)
        if limit is not None:
            self.refused[limit] += 1
            raise refusal(self.config, limit)
        held[user] = holds + 1
        if kind is Kind.REQUEST:
            self.clusters[cluster] = cluster_holds + 1
        elif kind is Kind.WATCH and proxy.watches is not None:
            shared = watch_subscriber(client, ctx, observers, keep_alive, proxy, plan, LimitedSubscriber)
            if shared is not None:
                assert isinstance(shared, LimitedSubscriber)
                shared.admission, shared.plan = self, plan
                return shared
        exchange = exchange_class(client, ctx, observers, keep_alive, proxy, plan)
        exchange.admission, exchange.kind = self, kind
        return exchange

    def release(self, plan: ProxyPlan, kind: Kind) -> None:
        _give_back(self.held[kind], plan.identity.user)
        if kind is Kind.REQUEST:
            _give_back(self.clusters, plan.upstream.cluster.name)


def _give_back(counts: dict[str, int], name: str) -> None:
    left = counts[name] - 1
    if left:
        counts[name] = left
    else:
        del counts[name]  # the dicts hold only who holds something


class LimitedExchange(ProxyExchange):
    """A ProxyExchange counted by Admission until it ends (finished or abandoned: both end here once)."""

    __slots__ = ("admission", "kind")

    admission: Admission
    kind: Kind

    def _observed_end(self) -> None:
        self.admission.release(self.plan, self.kind)
        super()._observed_end()


class LimitedVirtualClusterExchange(LimitedExchange, VirtualClusterExchange):
    """A virtual cluster's exchange (the host's review first), counted as a LimitedExchange."""

    __slots__ = ()


class LimitedSubscriber(WatchSubscriber):
    """A shared watch's subscriber, counted by Admission as one watch until it ends."""

    __slots__ = ("admission", "plan")

    admission: Admission
    plan: ProxyPlan

    def _observed_end(self) -> None:
        self.admission.release(self.plan, Kind.WATCH)
        super()._observed_end()
