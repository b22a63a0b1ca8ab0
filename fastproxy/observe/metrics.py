"""Prometheus metrics: counted per request as plain numbers, written out as text only when scraped.

The request observer takes requests in batches (context.BatchObserver: the connection's part is
a list append at each end of a request, and `Observers.flush` hands the batches over every
100 ms and before a scrape). For each finished request `finish_batch` finds the list of numbers
kept for its bounded labels (endpoint, cluster, verb, code) with one dict lookup, by method,
request target and code, and adds to it: the bytes, and the buckets and sums of the duration,
first-byte and size histograms, in one loop that makes no call but the bisections of values
past the usual buckets. A target's labels are derived when it is first seen (bench/micro/test_metrics_micro.py measures
both cases, and the same series kept with prometheus-client, several times slower;
`scripts/bench instructions` counts what the observer adds to a small GET). Labels never carry a user, a
user agent, a path or a key: the endpoint is the route kind ("none" for requests refused before
routing), the cluster a configured cluster's name ("" for any other), the verb one of VERBS
("other" otherwise), the code the status the client got (0: it left before one).
Pools, gauges and the process are read when a scrape comes.

With `workers = N` the supervisor makes a folder (`share_folder`) and every worker writes its
numbers there once a second (`Metrics.tick`), one file each; the worker a scrape reaches adds the
other workers' files to its own live numbers, so every scrape shows the sum over the workers.
When a worker ends the supervisor folds its counters into `retired.json` (`retire_worker`):
counters never go down, and its gauges leave the sum.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from .. import headers as hdrs
from ..auth.impersonation import ImpersonationReviewer
from ..auth.requestinfo import request_info, request_verb
from ..auth.scopes import check_scope
from ..limits import LIMITS
from ..local import LocalResponder
from ..proxy import is_long_running
from ..status import StatusError

if TYPE_CHECKING:
    from ..auth.credentials import Authenticator
    from ..auth.identity import Identity
    from ..auth.impersonation import NestedIdentity
    from ..clusters import ClusterRegistry, Upstream
    from ..config import Config
    from ..context import Observers, RequestContext
    from ..exchange import Connection
    from .rotating import BackgroundWriter

log = logging.getLogger("fastproxy.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
ADMIN_GROUPS = frozenset(("loft:admins", "system:masters"))
METRICS_PATH = "/metrics"
_METRICS_INFO = request_info("GET", METRICS_PATH, "")  # what a scoped key's rules are checked against

NO_ROUTE = "none"  # the endpoint of requests refused before routing (a bad path, bad HTTP)
VERBS = frozenset(("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "proxy",
                   "head", "post", "put", "options"))
OTHER_VERB = "other"
AUTH_FAILURE_REASONS = ("missing", "invalid_key", "expired_token", "revoked_token", "wrong_cluster", "malformed")
IMPERSONATION_OUTCOMES = ("allowed", "refused", "failed")
LOGS = ("audit", "access")

# Histogram buckets (upper bounds, seconds or bytes); the last bucket of each is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LONG_RUNNING_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456)

# One series' numbers, a list: the bytes and sums, then the first-byte, size and duration buckets.
# Each bucket counts the values above the one before it (cumulated when rendered); a series'
# count is the sum of its duration buckets, its size sum the bytes sent.
RECEIVED, SENT, DURATION_SUM, FIRST_BYTE_SUM = range(4)
FIRST_BYTE_AT = 4
SIZE_AT = FIRST_BYTE_AT + len(DURATION_BUCKETS) + 1
DURATION_AT = SIZE_AT + len(SIZE_BUCKETS) + 1
SHORT_LENGTH = DURATION_AT + len(DURATION_BUCKETS) + 1
LONG_LENGTH = DURATION_AT + len(LONG_RUNNING_BUCKETS) + 1

TARGET_MEMO = 4096  # request targets whose labels a worker remembers (the same ones come again and again)
RETIRED = "retired.json"  # the counters of workers that ended


def auth_failure_reason(message: str) -> str:
    """The AUTH_FAILURE_REASONS entry for a 401's message (fastproxy.headers.bearer_credential,
    auth.credentials.Authenticator and auth.tokens.TokenError word them)."""
    if "is required" in message:
        return "missing"
    if "has expired" in message:
        return "expired_token"
    if "revoked" in message:
        return "revoked_token"
    if "not valid for cluster" in message:
        return "wrong_cluster"
    if ("malformed" in message or "Authorization header" in message or "subprotocol" in message
            or "claim" in message or "no key id" in message):
        return "malformed"
    return "invalid_key"  # unknown, disabled or expired access key; untrusted or unverifiable token


class Metrics:
    """One worker's request observer and /metrics handler (see the module docstring)."""

    def __init__(self, config: Config, clusters: ClusterRegistry, authenticator: Authenticator,
                 share: str | None = None):
        self.config = config
        self.clusters = clusters
        self.authenticator = authenticator
        self.share = share  # the folder the workers' files meet in; None: one worker
        self._known = clusters.names
        # (endpoint, cluster, verb) -> code -> the numbers of that series; long-running requests apart.
        self.short: dict[tuple[str, str, str], dict[int, list[float]]] = {}
        self.long: dict[tuple[str, str, str], dict[int, list[float]]] = {}
        # (method, request target, code) -> the numbers of its short requests' series, TARGET_MEMO at
        # most: the labels of a target are derived once, not per request (forgotten each tick, as
        # clusters change).
        self._targets: dict[tuple[bytes, bytes, int], list[float]] = {}
        self.in_flight = 0  # requests begun and not finished, long-running ones apart
        self.watches: dict[str, int] = {}  # cluster label -> watches and followed logs open
        self.tunnels: dict[str, int] = {}  # cluster label -> upgrade requests open
        # Each open long-running request -> its gauge and cluster label, as counted at its start.
        self.streams: dict[RequestContext, tuple[dict[str, int], str]] = {}
        self.auth_failures = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.impersonation = dict.fromkeys(IMPERSONATION_OUTCOMES, 0)
        self.joiner_reviews = dict.fromkeys(IMPERSONATION_OUTCOMES, 0)  # shared watches across identities
        self.limited = dict.fromkeys(LIMITS, 0)  # requests refused with 429, by the limit they met
        self.logs: dict[str, BackgroundWriter] = {}  # the audit and access logs' writers, by LOGS name

    # --- the observer: batches of requests, on the event loop (context.BatchObserver) ----------

    batched = True

    def start_batch(self, begun: list[RequestContext]) -> None:
        """Count the requests begun as in flight; the long-running ones (an upgrade, a watch, a
        followed log) in their own gauges, with the cluster label of the moment they began."""
        self.in_flight += len(begun)
        for ctx in begun:
            route = ctx.route
            if route is None or not (ctx.head.upgrade or route.query and is_long_running(route.query)):
                continue
            cluster = route.cluster
            if cluster not in self._known:
                cluster = ""
            gauge = self.tunnels if ctx.head.upgrade else self.watches
            gauge[cluster] = gauge.get(cluster, 0) + 1
            self.streams[ctx] = (gauge, cluster)
            self.in_flight -= 1

    def finish_batch(self, done: list[RequestContext]) -> None:
        """Add each finished request to its series: the bytes, the sums and the buckets.

        One loop with everything it reads bound to locals: per short request it costs one dict
        lookup and no call but the bisections of values past the usual buckets (see the module
        docstring); a long-running one goes to `_long_finished`."""
        records, streams, new_record = self._targets, self.streams, self._record
        bisect, size_bounds = bisect_left, SIZE_BUCKETS
        bounds: tuple[float, ...] = DURATION_BUCKETS
        # The bounds an API request's times mostly fall under (1 to 25 ms), found by comparison.
        d_0, d_1, d_2, d_3, d_4 = bounds[:5]
        size_0, size_1, size_2 = size_bounds[:3]
        duration_at, size_at, first_byte_at = DURATION_AT, SIZE_AT, FIRST_BYTE_AT
        finished_long = 0
        for ctx in done:
            if streams and (stream := streams.pop(ctx, None)) is not None:
                self._long_finished(ctx, stream)
                finished_long += 1
                continue
            head = ctx.head
            status = ctx.status
            record = records.get((head.method, head.target, status))
            if record is None:
                record = new_record(ctx)
            started = ctx.started
            duration = ctx.ended - started
            sent = ctx.bytes_out
            if ctx.bytes_in:  # most requests have no body
                record[RECEIVED] += ctx.bytes_in
            record[SENT] += sent
            record[DURATION_SUM] += duration
            record[duration_at + (0 if duration <= d_0 else 1 if duration <= d_1 else 2 if duration <= d_2
                                  else 3 if duration <= d_3 else 4 if duration <= d_4 else bisect(bounds, duration))] += 1
            record[size_at + (0 if sent <= size_0 else 1 if sent <= size_1 else 2 if sent <= size_2
                              else bisect(size_bounds, sent))] += 1
            first_byte = ctx.first_byte
            if first_byte:
                first_byte -= started
                record[FIRST_BYTE_SUM] += first_byte
                record[first_byte_at + (0 if first_byte <= d_0 else 1 if first_byte <= d_1 else 2 if first_byte <= d_2
                                        else 3 if first_byte <= d_3 else 4 if first_byte <= d_4
                                        else bisect(bounds, first_byte))] += 1
            if status == 401:
                self.auth_failures[auth_failure_reason(ctx.message)] += 1
        self.in_flight -= len(done) - finished_long

    def _long_finished(self, ctx: RequestContext, stream: tuple[dict[str, int], str]) -> None:
        """A long-running request's end: its gauge down, its duration in the long-running buckets."""
        stream[0][stream[1]] -= 1
        by_code = self.long.setdefault(self._labels(ctx), {})
        record = by_code.get(ctx.status)
        if record is None:
            record = by_code[ctx.status] = [0] * LONG_LENGTH
        started = ctx.started
        duration = ctx.ended - started
        record[RECEIVED] += ctx.bytes_in
        record[SENT] += ctx.bytes_out
        record[DURATION_SUM] += duration
        record[DURATION_AT + bisect_left(LONG_RUNNING_BUCKETS, duration)] += 1
        record[SIZE_AT + bisect_left(SIZE_BUCKETS, ctx.bytes_out)] += 1
        if ctx.first_byte:
            first_byte = ctx.first_byte - started
            record[FIRST_BYTE_SUM] += first_byte
            record[FIRST_BYTE_AT + bisect_left(DURATION_BUCKETS, first_byte)] += 1
        if ctx.status == 401:
            self.auth_failures[auth_failure_reason(ctx.message)] += 1

    def _record(self, ctx: RequestContext) -> list[float]:
        """The numbers of a short request's series and code, not looked up lately (remembered by
        method, target and code: its labels follow from those)."""
        head = ctx.head
        by_code = self.short.setdefault(self._labels(ctx), {})
        record = by_code.get(ctx.status)
        if record is None:
            record = by_code[ctx.status] = [0] * SHORT_LENGTH
        if len(self._targets) >= TARGET_MEMO:
            self._targets.clear()
        self._targets[(head.method, head.target, ctx.status)] = record
        return record

    def _labels(self, ctx: RequestContext) -> tuple[str, str, str]:
        """(endpoint, cluster, verb), bounded (see the module docstring)."""
        route = ctx.route
        if route is None:
            return (NO_ROUTE, "", "")
        cluster = route.cluster
        verb = request_verb(ctx.method, route.path, route.query)
        return (route.kind, cluster if cluster in self._known else "", verb if verb in VERBS else OTHER_VERB)

    # --- /metrics ----------------------------------------------------------------------------

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers,
                  keep_alive: bool) -> MetricsRequest:
        """The handler of GET /metrics: checks who asks (see config.MetricsConfig)."""
        method = ctx.head.method
        if method != b"GET" and method != b"HEAD":
            raise StatusError(405, f"the method {method.decode('latin-1')} is not allowed on {METRICS_PATH}")
        if not self.config.metrics.open:
            found = ctx.found = hdrs.scan_client_headers(ctx.head.headers)
            identity = ctx.identity = self.authenticator.authenticate(hdrs.bearer_credential(found, None), None)
            if not may_scrape(identity):
                raise StatusError(403, f'forbidden: User "{identity.user}" cannot get path "{METRICS_PATH}"')
        return MetricsRequest(client, ctx, observers, keep_alive, self)

    def scrape(self) -> bytes:
        """The text a scrape answers: this worker's live numbers plus the other workers' files."""
        own = self.state()
        states = [own]
        pids = [os.getpid()]
        if self.share is not None:
            for pid, state in read_states(self.share, exclude=os.getpid()):
                states.append(state)
                if pid:
                    pids.append(pid)
        return render(merge(states), [figures for figures in map(process_figures, pids) if figures is not None],
                      workers=len(pids))

    # --- between workers ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """This worker's numbers as plain JSON data (what `merge` adds up and `render` shows)."""
        pools: dict[str, list[int]] = {}
        for pool in self.clusters.pools():
            figures = pools.setdefault(pool.cluster.name, [0, 0, 0, 0, 0])
            idle = len(pool.idle)
            figures[0] += idle
            figures[1] += pool.open_count - idle
        for name, stats in self.clusters.stats.items():
            figures = pools.setdefault(name, [0, 0, 0, 0, 0])
            figures[2:] = stats.dials, stats.dial_failures, stats.tls_resumptions
        return {
            "short": [[*labels, code, *record] for labels, by_code in self.short.items() for code, record in by_code.items()],
            "long": [[*labels, code, *record] for labels, by_code in self.long.items() for code, record in by_code.items()],
            "in_flight": self.in_flight,
            "watches": self._gauge(self.watches),
            "tunnels": self._gauge(self.tunnels),
            "auth_failures": self.auth_failures,
            "impersonation": self.impersonation,
            "joiner_reviews": self.joiner_reviews,
            "limited": self.limited,
            "pools": pools,
            "logs": {name: [writer.written, writer.dropped] for name, writer in self.logs.items()},
            "store_failing": int(self._store_failing()),
        }

    def _store_failing(self) -> bool:
        """Whether this worker serves from its last snapshot: the state store cannot be read now."""
        store = self.authenticator.store if self.authenticator is not None else None
        return store is not None and store.reader.failing

    def _gauge(self, gauge: dict[str, int]) -> dict[str, int]:
        """Every configured cluster, 0 when nothing is open on it."""
        values = {upstream.cluster.name: 0 for upstream in self.clusters}
        values.update(gauge)
        return values

    def tick(self) -> None:
        """Once a second: derive targets' labels anew (clusters come and go), and write this
        worker's numbers for the others to add to theirs."""
        self._targets.clear()
        if self.share is not None:
            try:
                write_state(self.share, os.getpid(), self.state())
            except OSError as error:
                log.error("metrics: cannot write %s: %s", self.share, error)

    def close(self) -> None:
        self.tick()


class MetricsRequest(LocalResponder):
    """GET /metrics, once `Metrics.responder` let it through."""

    __slots__ = ("metrics",)

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 metrics: Metrics):
        super().__init__(client, ctx, observers, keep_alive)
        self.metrics = metrics

    def handle(self) -> None:
        self.observers.flush()  # the requests observed until now, this one included
        self.send(200, self.metrics.scrape(), CONTENT_TYPE)


def may_scrape(identity: Identity) -> bool:
    """An administrator, and with a scoped key, a scope that allows GET /metrics (config.MetricsConfig)."""
    if ADMIN_GROUPS.isdisjoint(identity.groups):
        return False
    return identity.scope is None or check_scope(identity.scope, _METRICS_INFO, "Management") is None


class CountedReviewer(ImpersonationReviewer):
    """The impersonation reviewer, counting each request's review: allowed, refused, or failed
    (the cluster could not answer; the request is refused all the same)."""

    def __init__(self, counts: dict[str, int]):
        super().__init__()
        self.counts = counts

    async def refusal(self, upstream: Upstream, identity: Identity, nested: NestedIdentity) -> StatusError | None:
        try:
            refusal = await super().refusal(upstream, identity, nested)
        except Exception:
            self.counts["failed"] += 1
            raise
        if refusal is None:
            self.counts["allowed"] += 1
        elif refusal.message.startswith("impersonation cannot be checked"):
            self.counts["failed"] += 1
        else:
            self.counts["refused"] += 1
        return refusal


# --- the workers' files ----------------------------------------------------------------------


def share_folder() -> str:
    """A new folder for the workers' files (the supervisor's; removed with `remove_share`)."""
    return tempfile.mkdtemp(prefix="fastproxy-metrics-")


def remove_share(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def write_state(folder: str, name: int | str, state: dict[str, Any]) -> None:
    """Write `state` as NAME.json (a worker's pid, or "retired")."""
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".new", "wb") as f:
        f.write(orjson.dumps(state))
    os.replace(path + ".new", path)  # readers see the old file or the new one, never half of one


def read_states(folder: str, exclude: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(pid, state) of each worker's file but `exclude`'s; pid 0 for the retired workers' counters."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        stem, dot, extension = name.partition(".")
        if extension != "json" or (stem.isdigit() and int(stem) == exclude):
            continue
        try:
            with open(os.path.join(folder, name), "rb") as f:
                state = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            continue
        yield (int(stem) if stem.isdigit() else 0), state


def retire_worker(folder: str, pid: int) -> None:
    """The supervisor, when worker `pid` ended: keep its counters in `retired.json`, drop its gauges."""
    path = os.path.join(folder, f"{pid}.json")
    states = []
    for name in (RETIRED, f"{pid}.json"):
        try:
            with open(os.path.join(folder, name), "rb") as f:
                states.append(orjson.loads(f.read()))
        except (OSError, orjson.JSONDecodeError):
            pass
    write_state(folder, "retired", merge(states, gauges=False))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def merge(states: Iterable[dict[str, Any]], *, gauges: bool = True) -> dict[str, Any]:
    """The sum of workers' states; without `gauges`, only their counters (for ended workers)."""
    short: dict[tuple[Any, ...], list[float]] = {}
    long: dict[tuple[Any, ...], list[float]] = {}
    total: dict[str, Any] = {"in_flight": 0, "watches": {}, "tunnels": {}, "pools": {},
                             "auth_failures": dict.fromkeys(AUTH_FAILURE_REASONS, 0),
                             "impersonation": dict.fromkeys(IMPERSONATION_OUTCOMES, 0),
                             "joiner_reviews": dict.fromkeys(IMPERSONATION_OUTCOMES, 0),
                             "limited": dict.fromkeys(LIMITS, 0),
                             "logs": {name: [0, 0] for name in LOGS}, "store_failing": 0}
    for state in states:
        _add_rows(short, state.get("short", ()), 4)
        _add_rows(long, state.get("long", ()), 4)
        for name in ("auth_failures", "impersonation", "joiner_reviews", "limited"):
            for label, value in state.get(name, {}).items():
                total[name][label] = total[name].get(label, 0) + value
        for name, figures in state.get("logs", {}).items():
            summed = total["logs"].setdefault(name, [0, 0])
            summed[0] += figures[0]
            summed[1] += figures[1]
        for name, figures in state.get("pools", {}).items():
            summed = total["pools"].setdefault(name, [0, 0, 0, 0, 0])
            for i, value in enumerate(figures):
                if gauges or i >= 2:
                    summed[i] += value
        for name in ("watches", "tunnels"):
            for label, value in state.get(name, {}).items():
                total[name][label] = total[name].get(label, 0) + (value if gauges else 0)
        if gauges:
            total["in_flight"] += state.get("in_flight", 0)
            total["store_failing"] += state.get("store_failing", 0)
    total["short"] = [[*key, *record] for key, record in short.items()]
    total["long"] = [[*key, *record] for key, record in long.items()]
    return total


def _add_rows(table: dict[tuple[Any, ...], list[float]], rows: Iterable[list[Any]], labels: int) -> None:
    """Add state rows ([endpoint, cluster, verb, code, *record]) into `table`, keyed by their first
    `labels` fields: their records summed field by field."""
    for row in rows:
        key, record = tuple(row[:labels]), row[4:]
        found = table.get(key)
        if found is None:
            table[key] = list(record)
        else:
            for i, value in enumerate(record):
                found[i] += value


# --- the process -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


_BOOT_TIME = _boot_time()


def process_figures(pid: int) -> tuple[float, int, int, int, int, float] | None:
    """(CPU seconds, resident bytes, virtual bytes, open fds, fd limit, start time) of a process
    (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # fields from the third (state) on
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if pid == os.getpid() else _fd_limit(pid)
    except (OSError, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    start = _BOOT_TIME + int(fields[19]) / _CLOCK_TICKS
    return cpu, int(fields[21]) * _PAGE_SIZE, int(fields[20]), fds, limit, start


def _fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits", "rb") as f:
        for line in f:
            if line.startswith(b"Max open files"):
                soft = line.split()[3]
                return int(soft) if soft.isdigit() else 0
    return 0


# --- the text --------------------------------------------------------------------------------


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: Iterable[object]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values))


def _bound(value: float) -> str:
    """A bucket's `le` as prometheus-client writes it (Go's float format: 0.005, 5.0, 1.048576e+06)."""
    text = repr(float(value))
    dot = text.find(".")
    if dot > 6:
        return f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.") + f"e+{dot - 1:02d}"
    return text


def _number(value: float) -> str:
    if isinstance(value, int) or value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return "+Inf" if value == math.inf else repr(value)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines += (f"# HELP {name} {help}", f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: str, value: float) -> None:
        self.lines.append(f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}")

    def samples(self, name: str, kind: str, help: str, names: tuple[str, ...],
                values: Iterable[tuple[Iterable[object], float]]) -> None:
        self.family(name, kind, help)
        for labels, value in values:
            self.sample(name, _labels(names, labels), value)

    def histogram(self, name: str, help: str, series: dict[tuple[Any, ...], list[float]],
                  bounds: tuple[float, ...], at: int, total: int) -> None:
        """`series`: (endpoint, cluster, verb) -> record, whose buckets start at record[at] and
        whose sum is record[total]."""
        self.family(name, "histogram", help)
        for key, record in sorted(series.items()):
            labels = _labels(_ROUTE_LABELS, key)
            count = 0.0
            for i, bound in enumerate(bounds):
                count += record[at + i]
                self.sample(name + "_bucket", f'{labels},le="{_bound(bound)}"', count)
            count += record[at + len(bounds)]
            self.sample(name + "_bucket", f'{labels},le="+Inf"', count)
            self.sample(name + "_sum", labels, record[total])
            self.sample(name + "_count", labels, count)

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


_ROUTE_LABELS = ("endpoint", "cluster", "verb")


def _by_route(*tables: Iterable[list[Any]]) -> dict[tuple[Any, ...], list[float]]:
    """Rows added up over the code: (endpoint, cluster, verb) -> record."""
    summed: dict[tuple[Any, ...], list[float]] = {}
    for rows in tables:
        _add_rows(summed, rows, 3)
    return summed


def render(state: dict[str, Any], processes: list[tuple[float, int, int, int, int, float]], workers: int = 1) -> bytes:
    """The Prometheus text format (0.0.4) of a merged state and the workers' process figures."""
    out = _Text()
    rows = sorted(state["short"] + state["long"], key=lambda row: tuple(row[:4]))
    out.samples("fastproxy_requests_total", "counter", "Requests answered, by endpoint (route kind), cluster, verb and code.",
                (*_ROUTE_LABELS, "code"), ((row[:4], sum(row[4 + DURATION_AT:])) for row in rows))
    short, long = _by_route(state["short"]), _by_route(state["long"])
    out.histogram("fastproxy_request_duration_seconds",
                  "Time from the request head to the end of the response, long-running requests apart.",
                  short, DURATION_BUCKETS, DURATION_AT, DURATION_SUM)
    out.histogram("fastproxy_long_running_request_duration_seconds",
                  "How long watches, followed logs and upgraded connections (exec, attach, port-forward) lasted.",
                  long, LONG_RUNNING_BUCKETS, DURATION_AT, DURATION_SUM)
    every = _by_route(state["short"], state["long"])
    out.histogram("fastproxy_response_first_byte_seconds", "Time from the request head to the cluster's first response byte.",
                  {key: record for key, record in every.items() if any(record[FIRST_BYTE_AT:SIZE_AT])},
                  DURATION_BUCKETS, FIRST_BYTE_AT, FIRST_BYTE_SUM)
    out.histogram("fastproxy_response_size_bytes",
                  "Bytes sent to the client per response, head included, long-running requests apart.",
                  short, SIZE_BUCKETS, SIZE_AT, SENT)
    by_endpoint: dict[tuple[Any, ...], list[float]] = {}
    for key, record in every.items():
        totals = by_endpoint.setdefault(key[:2], [0, 0])
        totals[0] += record[RECEIVED]
        totals[1] += record[SENT]
    for name, i, help in (("fastproxy_received_bytes_total", 0, "Request body bytes received from clients (tunnel bytes after an upgrade)."),
                          ("fastproxy_sent_bytes_total", 1, "Response bytes sent to clients, heads included.")):
        out.samples(name, "counter", help, _ROUTE_LABELS[:2], ((key, totals[i]) for key, totals in sorted(by_endpoint.items())))
    out.samples("fastproxy_requests_in_flight", "gauge", "Requests begun and not yet finished, long-running requests apart.",
                (), [((), state["in_flight"])])
    for name, field, help in (("fastproxy_watches_open", "watches", "Watches and followed logs streaming now."),
                              ("fastproxy_tunnels_open", "tunnels", "Upgrade requests (exec, attach, port-forward) open now.")):
        out.samples(name, "gauge", help, ("cluster",), (((cluster,), value) for cluster, value in sorted(state[field].items())))
    pools = sorted(state["pools"].items())
    out.samples("fastproxy_upstream_connections", "gauge",
                "Connections to the clusters: idle in the pool, or busy (dialling included).", ("cluster", "state"),
                (((cluster, pool_state), figures[i]) for cluster, figures in pools
                 for i, pool_state in enumerate(("idle", "busy"))))
    for name, i, help in (("fastproxy_upstream_dials_total", 2, "Connections to the cluster attempted."),
                          ("fastproxy_upstream_dial_failures_total", 3, "Connection attempts that failed (refused, TLS, timeout)."),
                          ("fastproxy_upstream_tls_resumptions_total", 4, "TLS handshakes with the cluster that resumed a session.")):
        out.samples(name, "counter", help, ("cluster",), (((cluster,), figures[i]) for cluster, figures in pools))
    for name, field, label, help in (
            ("fastproxy_authentication_failures_total", "auth_failures", "reason", "Requests refused with 401, by reason."),
            ("fastproxy_impersonation_reviews_total", "impersonation", "outcome",
             "Impersonation (kubectl --as) checked with the cluster: allowed, refused, or failed to check."),
            ("fastproxy_shared_watch_reviews_total", "joiner_reviews", "outcome",
             "Joiners of a watch shared across identities, by their access reviews' outcome: allowed, "
             "refused, or failed to check (refused all the same)."),
            ("fastproxy_limited_requests_total", "limited", "limit", "Requests refused with 429 by a [limits] limit.")):
        out.samples(name, "counter", help, (label,), (((value_label,), value) for value_label, value in sorted(state[field].items())))
    out.samples("fastproxy_state_store_failing_workers", "gauge",
                "Workers serving from their last snapshot because the state store (SQLite file or etcd) cannot "
                "be read now; 0: every worker is current.", (), [((), state["store_failing"])])
    out.samples("fastproxy_log_lines_total", "counter",
                "Audit and access log lines written, or dropped (queue full, disk full, file not writable).",
                ("log", "outcome"), (((name, outcome), figures[i]) for name, figures in sorted(state["logs"].items())
                                     for i, outcome in enumerate(("written", "dropped"))))
    out.samples("fastproxy_workers", "gauge", "Worker processes whose numbers this scrape adds up.", (), [((), workers)])
    for name, kind, i, help in (("process_cpu_seconds_total", "counter", 0, "User and system CPU time of the workers, in seconds."),
                                ("process_resident_memory_bytes", "gauge", 1, "Resident memory of the workers, in bytes."),
                                ("process_virtual_memory_bytes", "gauge", 2, "Virtual memory of the workers, in bytes."),
                                ("process_open_fds", "gauge", 3, "Open file descriptors of the workers."),
                                ("process_max_fds", "gauge", 4, "The workers' limits of open file descriptors, added up.")):
        out.samples(name, kind, help, (), [((), sum(figures[i] for figures in processes))])
    out.samples("process_start_time_seconds", "gauge", "When the oldest worker started, in seconds since the epoch.", (),
                [((), min((figures[5] for figures in processes), default=0.0))])
    return out.text()
