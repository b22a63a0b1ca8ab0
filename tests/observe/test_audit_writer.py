"""The audit log's file side, with real files and real threads: rotation by size into gzipped
backups named as the API server's (lumberjack) are, pruning by count and by age, and what happens
when the disk cannot keep up, is full, or the path cannot be written: events dropped and counted,
nothing raised, no request held up."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from fastproxy.auth.identity import Identity
from fastproxy.context import RequestContext, RequestHead
from fastproxy.observe.audit import AuditConfig, AuditObserver
from fastproxy.observe.rotating import RUN_PIECES, BackgroundWriter, RotatingFile
from fastproxy.routing import route

BACKUP = re.compile(r"^audit-(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3})\.log(\.gz)?$")
ALICE = Identity("alice", ("dev",), "alice-key", b"")


def request(audit: AuditObserver, n: int = 0) -> float:
    """One small GET through the observer; the seconds its start and finish took."""
    target = f"/kubernetes/cluster/prod/api/v1/namespaces/dev/configmaps/cm-{n}"
    head = RequestHead(b"GET", target.encode(), b"1.1", [(b"User-Agent", b"kubectl/v1.31.0")], b"10.0.0.1")
    ctx = RequestContext(head, time.monotonic())
    ctx.route, ctx.identity = route(target), ALICE
    began = time.perf_counter()
    audit.start_batch([ctx])
    ctx.status, ctx.ended = 200, time.monotonic()
    audit.finish_batch([ctx])
    return time.perf_counter() - began


def backups(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if BACKUP.match(name))


def lines_of(folder) -> list[dict]:
    """Every event in the folder: the backups, oldest first, then the current file."""
    found = []
    for name in backups(folder):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(folder / name, "rt") as f:
            found += [json.loads(line) for line in f]
    current = folder / "audit.log"
    if current.exists():
        found += [json.loads(line) for line in current.read_text().splitlines()]
    return found


def wait_for(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H-%M-%S.") + f"{when.microsecond // 1000:03d}"


# --- rotation ---------------------------------------------------------------------------------------

def test_rotation_by_size_keeps_every_event_in_gzipped_backups(tmp_path):
    audit = AuditObserver(AuditConfig(path=str(tmp_path / "audit.log"), max_size_mb=4096 / (1024 * 1024),
                                      max_backups=0, max_age_days=0))
    for n in range(60):
        request(audit, n)
        if n % 10 == 9:
            assert audit.flush()  # several batches, so rotations happen between and within them
    audit.close()
    names = backups(tmp_path)
    assert len(names) >= 5 and all(name.endswith(".log.gz") for name in names), names
    assert (tmp_path / "audit.log").stat().st_size <= 4096
    for name in names:
        with gzip.open(tmp_path / name) as f:
            assert 0 < len(f.read()) <= 4096  # each backup was a whole file under the limit
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600
    events = lines_of(tmp_path)
    assert [e["objectRef"]["name"] for e in events if e["stage"] == "ResponseComplete"] == [f"cm-{n}" for n in range(60)]
    assert len(events) == 120 and audit.dropped == 0
    times = [BACKUP.match(name).group(1) for name in names]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert abs(datetime.strptime(times[-1], "%Y-%m-%dT%H-%M-%S.%f").replace(tzinfo=UTC).timestamp() - time.time()) < 60


def test_backups_beyond_max_backups_are_deleted_oldest_first(tmp_path):
    audit = AuditObserver(AuditConfig(path=str(tmp_path / "audit.log"), max_size_mb=2048 / (1024 * 1024), max_backups=3))
    for n in range(80):
        request(audit, n)
        if n % 5 == 4:
            assert audit.flush()
    audit.close()
    names = backups(tmp_path)
    assert len(names) == 3 and all(name.endswith(".gz") for name in names)
    kept = [e["objectRef"]["name"] for e in lines_of(tmp_path) if e["stage"] == "ResponseComplete"]
    assert kept == [f"cm-{n}" for n in range(80 - len(kept), 80)]  # the newest, in order, without a gap


def test_without_compression_backups_stay_plain(tmp_path):
    file = RotatingFile(str(tmp_path / "audit.log"), 100, max_backups=2, compress=False)
    for n in range(10):
        file.write([b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * 40)])
    file.close()
    names = backups(tmp_path)
    assert len(names) == 2 and not any(name.endswith(".gz") for name in names)
    assert [e["n"] for e in lines_of(tmp_path)] == [7, 8, 9]  # one line a file: two backups and the current one


def test_a_line_larger_than_the_limit_gets_a_file_of_its_own(tmp_path):
    file = RotatingFile(str(tmp_path / "audit.log"), 50, max_backups=0, compress=False)
    file.write([b"small\n", b"L" * 200 + b"\n", b"after\n"])
    file.close()
    contents = [open(tmp_path / name, "rb").read() for name in backups(tmp_path)] + [(tmp_path / "audit.log").read_bytes()]
    assert contents == [b"small\n", b"L" * 200 + b"\n", b"after\n"]


def test_an_existing_file_is_appended_to_and_counts_towards_the_size(tmp_path):
    (tmp_path / "audit.log").write_bytes(b"x" * 90 + b"\n")
    file = RotatingFile(str(tmp_path / "audit.log"), 100, compress=False)
    file.write([b"y" * 5 + b"\n"])
    assert (tmp_path / "audit.log").read_bytes() == b"x" * 90 + b"\n" + b"yyyyy\n"
    file.write([b"z" * 5 + b"\n"])  # 103 bytes would pass the limit: a new file
    file.close()
    assert (tmp_path / "audit.log").read_bytes() == b"zzzzz\n" and len(backups(tmp_path)) == 1


def test_a_file_moved_away_is_recreated(tmp_path):
    file = RotatingFile(str(tmp_path / "audit.log"), 1 << 20, clock=lambda: clock[0])
    clock = [time.time()]
    file.write([b"one\n"])
    os.rename(tmp_path / "audit.log", tmp_path / "moved.log")  # e.g. by an operator or logrotate
    clock[0] += 2
    file.write([b"two\n"])
    file.close()
    assert (tmp_path / "moved.log").read_bytes() == b"one\n" and (tmp_path / "audit.log").read_bytes() == b"two\n"


# --- pruning by age ---------------------------------------------------------------------------------

def test_backups_older_than_max_age_days_are_deleted(tmp_path):
    now = datetime.now(UTC)
    names = {age: f"audit-{stamp(now - timedelta(days=age))}.log.gz" for age in (1, 6, 8, 30)}
    for name in names.values():
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"{}\n")
    (tmp_path / "audit-notatime.log.gz").write_bytes(b"")     # not a backup: left alone
    (tmp_path / "other-2020-01-01T00-00-00.000.log.gz").write_bytes(b"")
    file = RotatingFile(str(tmp_path / "audit.log"), 1 << 20, max_backups=0, max_age_days=7)
    file.write([b"{}\n"])  # opening the file mills the old backups
    file.close()
    left = sorted(os.listdir(tmp_path))
    assert names[1] in left and names[6] in left and names[8] not in left and names[30] not in left
    assert "audit-notatime.log.gz" in left and "other-2020-01-01T00-00-00.000.log.gz" in left


def test_max_age_days_zero_keeps_old_backups_and_maintain_prunes_without_rotating(tmp_path):
    old = f"audit-{stamp(datetime.now(UTC) - timedelta(days=400))}.log.gz"
    (tmp_path / old).write_bytes(gzip.compress(b"{}\n"))
    keeping = RotatingFile(str(tmp_path / "audit.log"), 1 << 20, max_age_days=0)
    keeping.write([b"{}\n"])
    keeping.close()
    assert old in os.listdir(tmp_path)
    pruning = RotatingFile(str(tmp_path / "audit.log"), 1 << 20, max_age_days=7)
    pruning.maintain()
    pruning.close()
    assert old not in os.listdir(tmp_path)


def test_an_interrupted_compression_is_finished(tmp_path):
    when = stamp(datetime.now(UTC) - timedelta(hours=1))
    (tmp_path / f"audit-{when}.log").write_bytes(b'{"left":"uncompressed"}\n')
    file = RotatingFile(str(tmp_path / "audit.log"), 1 << 20)
    file.write([b"{}\n"])
    file.close()
    assert backups(tmp_path) == [f"audit-{when}.log.gz"]
    assert gzip.decompress((tmp_path / f"audit-{when}.log.gz").read_bytes()) == b'{"left":"uncompressed"}\n'
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


# --- when the disk cannot take them ---------------------------------------------------------------

def test_an_unwritable_path_drops_and_counts_without_raising_or_stalling(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("a regular file")
    audit = AuditObserver(AuditConfig(path=str(tmp_path / "not-a-folder" / "audit.log")))
    caplog.set_level(logging.WARNING, "fastproxy.observe")
    took = [request(audit, n) for n in range(100)]
    assert max(took) < 0.5, max(took)  # the requests never wait for the disk
    assert audit.flush()
    assert audit.dropped == 200 and audit.written == 0
    assert "NotADirectoryError" in audit.writer.last_error
    wait_for(lambda: "audit log:" in caplog.text and "dropped" in caplog.text, "a warning about the dropped events")
    assert caplog.text.count("lines dropped") == 1  # once a minute, not once a line
    request(audit, 100)
    audit.close()
    assert audit.dropped == 202


def test_a_full_disk_drops_and_counts(tmp_path):
    audit = AuditObserver(AuditConfig(path="/dev/full"))  # every write fails with ENOSPC
    for n in range(20):
        request(audit, n)
    assert audit.flush()
    audit.close()
    assert audit.dropped == 40 and audit.written == 0 and "No space left" in audit.writer.last_error


def test_a_disk_slower_than_the_requests_overflows_the_queue(tmp_path):
    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)  # opening it for writing blocks the writer thread until someone reads
    audit = AuditObserver(AuditConfig(path=str(fifo)), max_queued=10)
    took = [request(audit, n) for n in range(50)]
    assert max(took) < 0.5, max(took)  # while the writer thread is stuck in open()
    # The thread took one batch (at most the 10 queued) before it blocked; the queue then filled again.
    assert audit.writer.overflowed >= 100 - 2 * 10, audit.writer.overflowed
    assert audit.dropped == audit.writer.overflowed and audit.written == 0
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    audit.close()  # what was queued is written before the file closes
    reader.join(5)
    events = [json.loads(line) for line in received[0].splitlines()]
    assert len(events) == 100 - audit.dropped and audit.written == len(events)
    assert len(events) >= 10 and all(e["kind"] == "Event" for e in events)


def test_close_writes_everything_queued(tmp_path):
    audit = AuditObserver(AuditConfig(path=str(tmp_path / "audit.log")), max_queued=100_000)
    for n in range(2000):
        request(audit, n)
    audit.close()
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 4000 and audit.dropped == 0
    request(audit, 2000)  # after close: dropped and counted, not queued forever
    assert audit.dropped == 2


def test_an_idle_writer_wakes_for_the_next_line(tmp_path):
    path = tmp_path / "audit.log"
    writer = BackgroundWriter(RotatingFile(str(path), 1 << 20))
    time.sleep(0.2)  # the thread is asleep: woken by the line, or else after 1 s
    began = time.monotonic()
    writer.put(b'{"n":1}\n')
    wait_for(lambda: path.exists() and path.read_bytes() == b'{"n":1}\n', "the line written")
    assert time.monotonic() - began < 0.5
    writer.close()


def test_a_run_is_written_and_counted_as_its_lines(tmp_path):
    path = tmp_path / "audit.log"
    writer = BackgroundWriter(RotatingFile(str(path), 1 << 20))
    writer.put_run([b'{"n":1}\n', b'{"n":2}', b'\n'], 2)
    writer.put_run([], 0)  # nothing queued
    assert writer.flush() and writer.written == 2 and path.read_bytes() == b'{"n":1}\n{"n":2}\n'
    many = [b'{"n":%d}\n' % n for n in range(2 * RUN_PIECES + 1)]  # joined in parts below malloc's mmap threshold
    writer.put_run(many, len(many))
    assert writer.flush() and writer.written == 2 + len(many)
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n' + b"".join(many)
    writer.max_lines = 0  # the queue counts as full
    writer.put_run([b'{"n":3}\n', b'{"n":4}\n', b'{"n":5}\n'], 3)
    assert writer.overflowed == 3 and writer.dropped == 3
    writer.close()


def test_the_byte_bound_drops_too(tmp_path):
    writer = BackgroundWriter(RotatingFile(str(tmp_path / "audit.log"), 1 << 30), max_lines=1_000_000, max_bytes=1000)
    writer.queued_bytes = writer.done_bytes + 1000  # as if 1000 bytes were still queued
    assert writer.put(b"x" * 10 + b"\n") is False and writer.overflowed == 1
    writer.queued_bytes = writer.done_bytes
    assert writer.put(b'{"ok":1}\n') is True
    writer.close()
    assert (tmp_path / "audit.log").read_bytes() == b'{"ok":1}\n'


@pytest.mark.parametrize("path", ["-"])
def test_standard_error(path, capfd):
    audit = AuditObserver(AuditConfig(path=path))
    request(audit, 7)
    audit.close()
    events = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert [e["stage"] for e in events] == ["RequestReceived", "ResponseComplete"]
    assert events[0]["objectRef"]["name"] == "cm-7"
