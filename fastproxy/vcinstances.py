"""Virtual clusters created in the management API (`virtualclusterinstances`), served by every worker.

Each worker follows its state store snapshot: an instance that appears is served at once, one that
changes is served with its new settings, one that goes answers 404 to new requests while the
watches and tunnels still open through it are ended, spread over watch_termination_period as a
reload ends those of a removed cluster. A virtual cluster of the configuration wins over an
instance of the same cluster, namespace and name: the configuration is what an operator wrote
on the host, and an admin of the management API must not be able to redirect it.
"""
from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .client import ClientConnection
from .clusters import Upstream, upstream_ssl_context
from .config import ClusterConfig, VirtualClusterConfig
from .drain import Busy, busy, watch_end_offsets
from .store import Snapshot, StateReader, VirtualClusterInstance
from .upstream import Pool
from .virtualclusters import VirtualClusterExchange, VirtualClusters

Key = tuple[str, str, str]  # (host cluster, host namespace, name): how a request names a virtual cluster


def instance_key(instance: VirtualClusterInstance) -> Key:
    return (instance.cluster, instance.namespace, instance.name)


def instance_phase(instance: VirtualClusterInstance, hosts: Iterable[str], configured: Iterable[Key]) -> tuple[str, str]:
    """(phase, message) of an instance on this gateway: Ready, Shadowed (the configuration's wins) or Failed."""
    if instance_key(instance) in set(configured):
        return "Shadowed", "the gateway's configuration defines this virtual cluster; that definition is served"
    if instance.cluster not in set(hosts):
        return "Failed", f"the host cluster {instance.cluster!r} is not one of the gateway's clusters"
    return "Ready", ""


@dataclass(frozen=True)
class Changes:
    """What a worker does to follow a new snapshot: stop serving `removed`, (re)serve `put`."""
    removed: tuple[Key, ...]
    put: tuple[VirtualClusterInstance, ...]


def plan_changes(served: Mapping[Key, VirtualClusterInstance], instances: Iterable[VirtualClusterInstance],
                 configured: Iterable[Key]) -> Changes:
    """From what is served to the snapshot's instances, those the configuration shadows left out."""
    shadowed = set(configured)
    wanted = {instance_key(instance): instance for instance in instances if instance_key(instance) not in shadowed}
    removed = tuple(key for key in served if key not in wanted)
    put = tuple(instance for key, instance in wanted.items() if served.get(key) != instance)
    return Changes(removed, put)


def instance_config(instance: VirtualClusterInstance) -> VirtualClusterConfig:
    """The instance as the registry serves it; a server of its own becomes a ClusterConfig without files
    (its CA and token are in memory, see direct_upstream)."""
    server = None
    if instance.server:
        url = urlsplit(instance.server)
        assert url.hostname is not None  # the store checked the URL
        server = ClusterConfig(name="/".join(instance_key(instance)), scheme="https", host=url.hostname,
                               port=url.port or 443)
    return VirtualClusterConfig(instance.cluster, instance.namespace, instance.name, server)


def direct_upstream(loop: asyncio.AbstractEventLoop, instance: VirtualClusterInstance,
                    cluster: ClusterConfig) -> Upstream:
    """The handle of an instance's own API server: its CA, and its token as the credential."""
    ca_pem = base64.b64decode(instance.ca_data).decode("ascii") if instance.ca_data else ""
    upstream = Upstream(cluster, Pool(loop, cluster, upstream_ssl_context(cluster, ca_pem)))
    if instance.token:
        upstream.credential = b"Authorization: Bearer " + instance.token.encode("ascii") + b"\r\n"
    return upstream


def streams_through(connections: Iterable[ClientConnection], key: Key) -> list[ClientConnection]:
    """The connections whose watch or tunnel goes to virtual cluster `key`."""
    found = []
    for conn in connections:
        exchange = conn.active
        if isinstance(exchange, VirtualClusterExchange) and busy(conn) in (Busy.WATCH, Busy.TUNNEL):
            route = exchange.ctx.route
            if route is not None and (route.cluster, route.namespace, route.virtual_cluster) == key:
                found.append(conn)
    return found


def _end(conn: ClientConnection) -> None:
    """FIN after what was sent: the client sees its stream end, and relists or retries."""
    if conn.transport is not None:  # None: it closed meanwhile
        conn.transport.close()


class InstanceFollower:
    """Keeps one worker's VirtualClusters in step with the snapshots' virtualclusterinstances, and
    ends the streams of those no longer served (over `period()` seconds, as a reload does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: VirtualClusters,
                 configured: Iterable[VirtualClusterConfig], connections: Iterable[ClientConnection],
                 period: Callable[[], float]):
        self.loop = loop
        self.registry = registry
        self.configured = frozenset((config.cluster, config.namespace, config.name) for config in configured)
        self.connections = connections
        self.period = period
        self.served: dict[Key, VirtualClusterInstance] = {}

    def subscribe(self, reader: StateReader) -> None:
        self.follow(reader.snapshot)
        reader.subscribe(self.follow)

    def ended(self, key: Key) -> None:
        streams = streams_through(self.connections, key)
        for conn, offset in zip(streams, watch_end_offsets(len(streams), self.period())):
            self.loop.call_later(offset, _end, conn)

    def follow(self, snapshot: Snapshot) -> None:
        changes = plan_changes(self.served, snapshot.virtual_cluster_instances.values(), self.configured)
        for key in changes.removed:
            self.registry.remove(instance_config(self.served.pop(key)))
            self.ended(key)
        for instance in changes.put:
            config = instance_config(instance)
            direct = direct_upstream(self.loop, instance, config.server) if config.server is not None else None
            self.registry.put(config, direct)
            self.served[instance_key(instance)] = instance
