"""Back-off for failed logins, per user name and per client address: pure decisions and a bounded table.

Every login attempt counts as a failure from the moment it is let through until its password is
found right (`forgiven`), so attempts sent in parallel are counted before any is checked; a wrong
one restarts the wait when it is answered (`answered`). After
`free_failures`, each further failure doubles the wait before the next attempt: 1 s, 2 s, 4 s,
... up to `max_backoff`. A record without failures for `forget_after` seconds is forgotten.
"""
from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    free_failures: int = 3
    max_backoff: float = 300.0
    forget_after: float = 900.0


@dataclass(frozen=True, slots=True)
class Failures:
    count: int
    last: float  # time.monotonic() of the latest attempt counted


def delay(count: int, policy: Backoff) -> float:
    """Seconds to wait after the latest of `count` failures before another attempt."""
    over = count - policy.free_failures
    return 0.0 if over <= 0 else min(2.0 ** (over - 1), policy.max_backoff)


def retry_after(record: Failures | None, now: float, policy: Backoff) -> float:
    """Seconds until an attempt may be made (0: now)."""
    if record is None:
        return 0.0
    wait = delay(record.count, policy)
    return max(0.0, record.last + wait - now) if wait else 0.0


def is_stale(record: Failures, now: float, policy: Backoff) -> bool:
    return now - record.last >= max(policy.forget_after, delay(record.count, policy))


def counted(record: Failures | None, now: float, policy: Backoff) -> Failures:
    """The record after one more attempt (a failure until forgiven)."""
    if record is None or is_stale(record, now, policy):
        return Failures(1, now)
    return Failures(record.count + 1, now)


def answered(record: Failures | None, now: float) -> Failures:
    """The record once an attempt it counted turned out wrong: the wait runs from the answer, not the
    attempt's start (a check can take a while); a record dropped meanwhile starts again with this one."""
    if record is None:
        return Failures(1, now)
    return Failures(record.count, max(record.last, now))


def forgiven(record: Failures | None) -> Failures | None:
    """The record once an attempt it counted turned out to be right (None: nothing left)."""
    if record is None or record.count <= 1:
        return None
    return Failures(record.count - 1, record.last)


def client_group(address: str) -> str:
    """Whose failures an address shares: itself for IPv4, its /64 for IPv6 (one host commonly holds a
    whole /64, so single addresses would cost an attacker nothing); IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address  # not an IP address (a unix socket): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def retry_after_header(seconds: float) -> int:
    """Whole seconds for a Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(seconds))


class FailureTable:
    """Failure records by key, at most `capacity` of them: the least recently attempted go first."""

    def __init__(self, policy: Backoff, capacity: int = 10_000):
        self.policy = policy
        self.capacity = capacity
        self.records: OrderedDict[Hashable, Failures] = OrderedDict()

    def retry_after(self, key: Hashable, now: float) -> float:
        return retry_after(self.records.get(key), now, self.policy)

    def count(self, key: Hashable, now: float) -> None:
        self.records[key] = counted(self.records.get(key), now, self.policy)
        self.records.move_to_end(key)
        while len(self.records) > self.capacity:
            self.records.popitem(last=False)

    def failed(self, key: Hashable, now: float) -> None:
        self.records[key] = answered(self.records.get(key), now)
        self.records.move_to_end(key)

    def forgive(self, key: Hashable) -> None:
        record = forgiven(self.records.get(key))
        if record is None:
            self.records.pop(key, None)
        else:
            self.records[key] = record

    def clear(self, key: Hashable) -> None:
        self.records.pop(key, None)

    def prune(self, now: float) -> None:
        """Drop stale records, oldest first (the table is in order of latest attempt)."""
        while self.records:
            key, record = next(iter(self.records.items()))
            if not is_stale(record, now, self.policy):
                break
            del self.records[key]
