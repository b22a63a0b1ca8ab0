"""The clusters this worker reaches: one handle per cluster (pool, credential, TLS) in a registry
that can add, replace and remove clusters while requests run.

A replaced or removed cluster's pool is retired, not closed: requests already holding it (watches,
exec and port-forward tunnels) finish on it, it pools no connection again, and it is gone once its
last connection closes. New requests get the new handle.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Iterator

from .config import ClusterConfig
from .upstream import Pool, PoolStats, ResumingContext

log = logging.getLogger("fastproxy.clusters")


def upstream_ssl_context(cluster: ClusterConfig, ca_data: str = "") -> ResumingContext | None:
    """`ca_data` (PEM) stands in for ca_file where the CA comes from the state store, not a file."""
    if cluster.scheme != "https":
        return None
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    if ca_data:
        context.load_verify_locations(cadata=ca_data)
    elif cluster.ca_file:
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


class Upstream:
    """One cluster as this worker reaches it: the pool plus prebuilt header lines."""

    path_prefix = ""  # put before every path sent; a virtual cluster's service proxy sets one

    def __init__(self, cluster: ClusterConfig, pool: Pool):
        self.cluster = cluster
        self.pool = pool
        self.host_line = b"Host: " + cluster.authority.encode() + b"\r\n"
        self.credential = b""
        self._token_mtime = 0.0
        self.refresh_credential()

    @classmethod
    def connect(cls, loop: asyncio.AbstractEventLoop, cluster: ClusterConfig, stats: PoolStats | None = None) -> Upstream:
        return cls(cluster, Pool(loop, cluster, upstream_ssl_context(cluster), stats))

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


class ClusterRegistry:
    """Cluster name -> Upstream, changeable at runtime (reload, managed clusters)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clusters: Iterable[ClusterConfig] = ()):
        self.loop = loop
        self._by_name: dict[str, Upstream] = {}
        self.names = self._by_name.keys()  # a live view: `name in registry.names` costs no call
        self.get: Callable[[str], Upstream | None] = self._by_name.get  # the dict's own: no Python call
        self._retired: list[Pool] = []
        self.stats: dict[str, PoolStats] = {}  # cluster name -> its pools' dial counts, replacements included
        for cluster in clusters:
            self.put(cluster)

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def put(self, cluster: ClusterConfig, renew: bool = False) -> Upstream:
        """Add a cluster, or replace the one of that name: new requests use the new settings.
        `renew` replaces it even with the same settings (its files may have changed in place)."""
        old = self._by_name.get(cluster.name)
        if old is not None and old.cluster == cluster and not renew:
            return old
        return self.adopt(Upstream.connect(self.loop, cluster, self.stats.setdefault(cluster.name, PoolStats())))

    def adopt(self, upstream: Upstream) -> Upstream:
        """Add a handle built elsewhere (its credential not from a file), replacing the one of its name."""
        old = self._by_name.get(upstream.cluster.name)
        self._by_name[upstream.cluster.name] = upstream
        if old is not None:
            self._retire(old)
            log.info("cluster %s: replaced; requests in flight finish on the old connections", upstream.cluster.name)
        return upstream

    def remove(self, name: str) -> bool:
        old = self._by_name.pop(name, None)
        if old is not None:
            self._retire(old)
        return old is not None

    def sync(self, clusters: Iterable[ClusterConfig], renew: bool = False) -> list[str]:
        """Make the registry hold exactly `clusters` (what reload calls); the names removed."""
        wanted = {cluster.name: cluster for cluster in clusters}
        removed = [name for name in self._by_name if name not in wanted]
        for name in removed:
            self.remove(name)
        for cluster in wanted.values():
            self.put(cluster, renew)
        return removed

    def pools(self) -> Iterator[Pool]:
        """Every pool holding connections: the clusters' own, and the retired ones still draining."""
        for upstream in self._by_name.values():
            yield upstream.pool
        yield from self._retired

    def _retire(self, upstream: Upstream) -> None:
        upstream.pool.retire()
        self._retired.append(upstream.pool)

    def tick(self) -> None:
        """Once a second or so: expire idle connections, pick up rotated tokens, drop drained pools."""
        for upstream in self._by_name.values():
            upstream.pool.expire_idle()
            upstream.refresh_credential()
        if self._retired:
            self._retired = [pool for pool in self._retired if pool.open_count > 0]

    def close(self) -> None:
        for upstream in self._by_name.values():
            upstream.pool.close()
        for pool in self._retired:
            pool.close()
