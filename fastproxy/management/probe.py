"""Cluster health for the management API's `clusters`: measured in the background, never per request.

Each worker asks every cluster of its registry for `/version` through the same pool the proxy
uses (so a probe also proves the pool's credentials and TLS), every PROBE_INTERVAL seconds, and
keeps the answer; `clusters` requests read what was last measured.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ..clusters import ClusterRegistry, Upstream
from ..upstream_client import UpstreamRequestError, request

log = logging.getLogger("fastproxy.management")

PROBE_INTERVAL = 15.0
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ClusterHealth:
    phase: str                 # Ready, Unreachable, or Unknown until the first probe ends
    kubernetes_version: str = ""
    latency: float = 0.0       # seconds for the /version round trip
    checked: float = 0.0       # unix time of the probe
    message: str = ""


UNKNOWN = ClusterHealth("Unknown", message="not probed yet")


class ClusterProbe:
    """The last measured health of each cluster; `changed(name)` is called when one changes."""

    def __init__(self, clusters: ClusterRegistry, loop: asyncio.AbstractEventLoop, changed: Callable[[str], None]):
        self.clusters = clusters
        self.loop = loop
        self.changed = changed
        self.health: dict[str, ClusterHealth] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.round_ended = 0.0  # time.monotonic() when the last round of probes ended

    def start(self) -> None:
        self.task = self.loop.create_task(self._run())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def hasten(self, age: float) -> None:
        """Probe again now if the last round ended more than `age` seconds ago (the status page
        asks while someone watches it, so a cluster going down shows within seconds)."""
        if time.monotonic() - self.round_ended > age:
            self.wake.set()

    def of(self, name: str) -> ClusterHealth:
        return self.health.get(name, UNKNOWN)

    async def _run(self) -> None:
        while True:
            upstreams = list(self.clusters)
            results = await asyncio.gather(*(self._probe(upstream) for upstream in upstreams))
            names = {upstream.cluster.name for upstream in upstreams}
            for name in [name for name in self.health if name not in names]:
                del self.health[name]
            for upstream, health in zip(upstreams, results):
                name = upstream.cluster.name
                before = self.health.get(name)
                self.health[name] = health
                if before is None or (before.phase, before.kubernetes_version) != (health.phase, health.kubernetes_version):
                    self.changed(name)
            self.round_ended = time.monotonic()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), PROBE_INTERVAL)
            except TimeoutError:
                pass

    async def _probe(self, upstream: Upstream) -> ClusterHealth:
        started = time.monotonic()
        try:
            code, body = await request(upstream, "GET", "/version", timeout=PROBE_TIMEOUT, limit=64 * 1024)
        except UpstreamRequestError as error:
            return ClusterHealth("Unreachable", checked=time.time(), message=error.message)
        latency = time.monotonic() - started
        if code != 200:
            return ClusterHealth("Unreachable", latency=latency, checked=time.time(), message=f"/version answered {code}")
        try:
            version = orjson.loads(body).get("gitVersion", "")
        except (orjson.JSONDecodeError, AttributeError):
            version = ""
        return ClusterHealth("Ready", str(version), latency, time.time())
