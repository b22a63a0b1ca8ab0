"""Login back-off: the pure decisions, and the bounded table over them (no sockets)."""
from __future__ import annotations

import pytest

from fastproxy.auth.limiter import (
    Backoff,
    Failures,
    FailureTable,
    answered,
    client_group,
    counted,
    delay,
    forgiven,
    is_stale,
    retry_after,
    retry_after_header,
)

POLICY = Backoff(free_failures=3, max_backoff=60.0, forget_after=900.0)


def test_the_delay_doubles_after_the_free_failures_up_to_the_cap():
    assert [delay(count, POLICY) for count in range(0, 12)] == [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert delay(4, Backoff(free_failures=0, max_backoff=5.0)) == 5.0


def test_retry_after_counts_from_the_latest_failure():
    assert retry_after(None, 100.0, POLICY) == 0
    assert retry_after(Failures(3, 100.0), 100.0, POLICY) == 0
    assert retry_after(Failures(5, 100.0), 100.5, POLICY) == 1.5
    assert retry_after(Failures(5, 100.0), 102.0, POLICY) == 0


def test_counting_starts_again_once_a_record_is_stale():
    assert counted(None, 5.0, POLICY) == Failures(1, 5.0)
    assert counted(Failures(4, 5.0), 6.0, POLICY) == Failures(5, 6.0)
    assert is_stale(Failures(4, 5.0), 905.0, POLICY) and not is_stale(Failures(4, 5.0), 904.0, POLICY)
    assert counted(Failures(9, 5.0), 905.0, POLICY) == Failures(1, 905.0)
    # a wait longer than forget_after is served in full before the record is forgotten
    assert not is_stale(Failures(20, 0.0), 900.0, Backoff(0, 2000.0, 900.0))


def test_forgiving_undoes_one_attempt():
    assert forgiven(None) is None
    assert forgiven(Failures(1, 5.0)) is None
    assert forgiven(Failures(5, 5.0)) == Failures(4, 5.0)


def test_a_wrong_answer_restarts_the_wait_from_when_it_was_given():
    assert answered(Failures(5, 10.0), 10.8) == Failures(5, 10.8)
    assert retry_after(answered(Failures(5, 10.0), 10.8), 11.0, POLICY) == pytest.approx(1.8)
    assert answered(Failures(5, 10.0), 9.0) == Failures(5, 10.0)  # never earlier
    assert answered(None, 3.0) == Failures(1, 3.0)  # cleared meanwhile: counted again


def test_retry_after_header_is_whole_seconds_rounded_up():
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 1.01, 59.5)] == [1, 1, 1, 2, 60]


def test_parallel_attempts_are_counted_before_any_is_checked():
    table = FailureTable(POLICY)
    for _ in range(4):  # four attempts arrive together: each is let through and counted
        assert table.retry_after("alice", 10.0) == 0
        table.count("alice", 10.0)
    assert table.retry_after("alice", 10.0) == 1.0  # the fifth waits, whether or not the four were right
    table.failed("alice", 10.5)  # one of them answered wrong
    assert table.retry_after("alice", 10.5) == 1.0
    table.forgive("alice")
    assert table.retry_after("alice", 10.0) == 0
    table.clear("alice")
    assert "alice" not in table.records


def test_the_table_is_bounded_and_drops_the_least_recently_attempted():
    table = FailureTable(POLICY, capacity=3)
    for i, key in enumerate(("a", "b", "c")):
        table.count(key, float(i))
    table.count("a", 3.0)      # a is now the most recent
    table.count("d", 4.0)      # over capacity: b goes
    assert list(table.records) == ["c", "a", "d"]


def test_prune_drops_stale_records_oldest_first():
    table = FailureTable(POLICY)
    table.count("old", 0.0)
    table.count("new", 500.0)
    table.prune(950.0)
    assert list(table.records) == ["new"]
    table.prune(1400.0)
    assert table.records == {}


def test_ipv6_clients_share_their_slash_64():
    assert client_group("192.0.2.7") == "192.0.2.7"
    assert client_group("2001:db8:1:2:aaaa::1") == client_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_group("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_group("fe80::1%eth0") == "fe80::/64"
    assert client_group("unix") == "unix"
