"""The access log: one JSON line per request, sampled, written off the event loop.

Every request gets an id while the log is on (context.RequestIds: the X-Request-Id response
header, and the auditID of its audit events), whether or not its line is sampled, so that a
client quoting the header finds the gateway's audit events and, when sampled, its line here.
A finished request is logged with the probability `sample` (`sample_errors` for codes of 400
and above, and for requests that got no answer). The log takes its requests in batches
(context.BatchObserver) and counts down to the next one it logs (the gaps between logged requests
are geometric, drawn once per logged request), so a request left out costs a comparison and a
subtraction. The lines go through rotating.BackgroundWriter, like the audit log's: the loop
only queues them, and a full disk drops lines (counted, reported once a minute), never requests.

A line holds no secret: never a header value but the user agent's, never the query of a path
outside the Kubernetes APIs (an OAuth code or state travels there).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import ConfigError, _Table
from ..context import RequestContext
from ..routing import CLUSTER, MANAGEMENT, VIRTUAL_CLUSTER
from .rotating import BackgroundWriter, LogFile, Sink, log_file_fields, open_sink

# Routes whose query is a Kubernetes API query (selectors, watch, limits), kept in the line.
_KUBERNETES_ROUTES = frozenset((CLUSTER, VIRTUAL_CLUSTER, MANAGEMENT))
NO_ROUTE = "none"
MAX_USER_AGENT = 256
MAX_PATH = 1024


@dataclass(frozen=True, slots=True)
class AccessLogConfig(LogFile):
    """`[access_log]` (unless `enabled = false`): to standard error by default; `sample` is the share of successful
    requests logged (a busy gateway answers tens of thousands a second: every one of them would
    flood journald, which drops what passes its rate limit), `sample_errors` that of the rest."""

    sample: float = 0.01
    sample_errors: float = 1.0


def parse_access_log_config(data: object) -> AccessLogConfig | None:
    """The table checked whole (even when `enabled = false`); None when the log is off."""
    t = _Table(data, "access_log")
    enabled = t.bool("enabled", True)
    config = AccessLogConfig(**log_file_fields(t, default_path="-"), sample=_share(t, "sample", 0.01),
                             sample_errors=_share(t, "sample_errors", 1.0))
    t.finish()
    return config if enabled else None


def _share(t: _Table, key: str, default: float) -> float:
    value: float = t.positive(key, float, default, allow_zero=True)
    if value > 1:
        raise ConfigError(f"{t.key(key)}: must be between 0 and 1, not {value!r}")
    return value


class AccessLog:
    """A batched request observer (context.BatchObserver) that looks at finished requests only."""

    batched = True

    def __init__(self, config: AccessLogConfig, *, sink: Sink | None = None, max_queued: int = 8192):
        self.sample = config.sample
        self.sample_errors = config.sample_errors
        self.writer = BackgroundWriter(sink if sink is not None else open_sink(config), max_lines=max_queued,
                                       what="access log", name="access-log-writer")
        self.random = random.random
        self.skip = self.gap(self.sample)
        self.skip_errors = self.gap(self.sample_errors)

    def start_batch(self, begun: list[RequestContext]) -> None:
        """Nothing: a line is made when its request has finished."""

    def finish_batch(self, done: list[RequestContext]) -> None:
        # Count down to the next request logged (geometric gaps: `sampled`), successes and the rest apart.
        chosen = []
        skip, skip_errors = self.skip, self.skip_errors
        for ctx in done:
            if 0 < ctx.status < 400:
                if skip:
                    skip -= 1
                    continue
                skip = self.gap(self.sample)
            else:
                if skip_errors:
                    skip_errors -= 1
                    continue
                skip_errors = self.gap(self.sample_errors)
            chosen.append(ctx)
        self.skip, self.skip_errors = skip, skip_errors
        if not chosen:
            return
        wall = time.time() - time.monotonic()  # + a monotonic time: that time on the wall clock
        self.writer.put_run([orjson.dumps(access_line(ctx, wall + ctx.ended), option=orjson.OPT_APPEND_NEWLINE)
                             for ctx in chosen], len(chosen))

    def gap(self, rate: float) -> int:
        """How many requests to pass over before the next one logged, for a share `rate` logged."""
        if rate >= 1:
            return 0
        if rate <= 0:
            return 1 << 62
        return int(math.log(1.0 - self.random()) / math.log1p(-rate))

    def close(self) -> None:
        self.writer.close()


def access_line(ctx: RequestContext, now: float) -> dict[str, Any]:
    """The line of a finished request (`now`: the wall-clock time it ended)."""
    head = ctx.head
    where = ctx.route
    line: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "id": ctx.request_id, "remote": head.client_ip.decode("latin-1"), "method": ctx.method,
    }
    if where is None:
        line["endpoint"] = NO_ROUTE
        line["path"] = head.target.decode("latin-1").partition("?")[0][:MAX_PATH]
    else:
        line["endpoint"] = where.kind
        line["path"] = where.path[:MAX_PATH]
        if where.query and where.kind in _KUBERNETES_ROUTES:
            line["query"] = where.query[:MAX_PATH]
        if where.cluster:
            line["cluster"] = where.cluster
        if where.virtual_cluster:
            line["virtualCluster"] = f"{where.namespace}/{where.virtual_cluster}"
        info = ctx.info if where.kind in _KUBERNETES_ROUTES else None
        if info is not None:
            line["verb"] = info.verb
            if info.resource:
                line["resource"] = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
            if info.namespace:
                line["namespace"] = info.namespace
            if info.name:
                line["name"] = info.name
    identity = ctx.identity
    if identity is not None:
        line["user"] = identity.user
        line["credential"] = identity.source  # the access key's name, never the key
    line["code"] = ctx.status
    if ctx.message:
        line["message"] = ctx.message
    line["bytesIn"] = ctx.bytes_in
    line["bytesOut"] = ctx.bytes_out
    line["duration"] = round(ctx.ended - ctx.started, 6)
    if ctx.first_byte:
        line["upstream"] = round(ctx.first_byte - ctx.started, 6)  # to the cluster's first response byte
    for name, value in head.headers:
        if len(name) == 10 and name.lower() == b"user-agent":
            line["userAgent"] = value[:MAX_USER_AGENT].decode("utf-8", "replace")
            break
    return line
