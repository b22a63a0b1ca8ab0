"""Log lines written off the event loop: a bounded queue, one writer thread, rotated files.

`BackgroundWriter.put` is all the event loop does per line: an append to a deque and two
comparisons; `put_run` queues the lines of a whole batch of requests as one entry. When the
queue is full (the disk is slower than the requests, full, or the file cannot be opened) lines
are dropped and counted, never waited for; the writer thread reports drops at most once a
minute. The thread sleeps until a line arrives, then writes everything queued at once: the
observers queue their lines in batches (context.FLUSH_INTERVAL), so the thread takes the GIL a
few times a second, not once per request.

`RotatingFile` rotates the way the API server's audit log does (lumberjack): when a write would
take the file past `max_bytes` it is renamed `NAME-2026-12-03T07-20-00.123.EXT` (UTC, the time
of the rotation), gzipped in the background to `...EXT.gz` when `compress` is on, and backups
beyond `max_backups` or older than `max_age_days` (by the time in their name) are deleted; 0
means no limit for either. New files are created mode 0600.
"""
from __future__ import annotations

import collections
import gzip
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import _Table

log = logging.getLogger("fastproxy.observe")

BACKUP_TIME_FORMAT = "%Y-%m-%dT%H-%M-%S"
RETRY_OPEN = 1.0           # seconds between attempts to open a file that could not be opened
MAINTAIN_EVERY = 3600.0    # seconds between age prunings when nothing rotates
DROP_REPORT_EVERY = 60.0   # seconds between warnings about dropped lines
MAX_WRITE = 1 << 19        # bytes joined for one write call at most: below malloc's mmap threshold
RUN_PIECES = 1024          # pieces of a run joined into one queue entry (see put_run)
MAX_BATCH = 8192           # queue entries taken at once
FEW_ENTRIES = 4            # queue entries written one by one rather than joined (an observer's batch is one)


@dataclass(frozen=True, slots=True)
class LogFile:
    """Where a log's lines go and how its file rotates (the audit and access logs' tables)."""

    path: str                           # the log file; "-" for standard error
    max_size_mb: float = 100.0          # rotate when the file would pass this size
    max_age_days: float = 7.0           # delete backups older than this (by the time in their name); 0: keep
    max_backups: int = 5                # keep this many backups at most; 0: no limit
    compress: bool = True               # gzip the backups


def log_file_fields(t: _Table, default_path: str | None = None) -> dict[str, Any]:
    """A table's LogFile keys, checked (ConfigError naming the key), as keyword arguments."""
    from ..config import ConfigError, _writable_path

    path = t.str("path", default_path, required=default_path is None)
    if not path:
        raise ConfigError(f"{t.key('path')}: must not be empty (\"-\" writes to standard error)")
    if path != "-":
        _writable_path(t, "path", required=True)
    return {"path": path, "max_size_mb": t.positive("max_size_mb", float, 100.0),
            "max_age_days": t.positive("max_age_days", float, 7.0, allow_zero=True),
            "max_backups": t.positive("max_backups", int, 5, allow_zero=True), "compress": t.bool("compress", True)}


def open_sink(log_file: LogFile) -> Sink:
    if log_file.path == "-":
        return StderrSink()
    return RotatingFile(log_file.path, max(1, int(log_file.max_size_mb * 1024 * 1024)), log_file.max_backups,
                        log_file.max_age_days, log_file.compress)


class Sink(Protocol):
    """Where the writer thread puts lines; raises OSError when it cannot."""

    def write(self, lines: Sequence[bytes]) -> None: ...

    def maintain(self) -> None: ...

    def close(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StderrSink:
    """Path "-": lines to standard error, never rotated."""

    def __init__(self, fd: int = 2):
        self.fd = fd

    def write(self, lines: Sequence[bytes]) -> None:
        _write_all(self.fd, b"".join(lines))

    def maintain(self) -> None:
        pass

    def close(self) -> None:
        pass


class RotatingFile:
    """An append-only file rotated by size, with gzipped backups pruned by count and age.

    Used by one thread (the writer's); compression runs on a helper thread of its own so a
    rotation of a large file does not hold up the lines behind it.
    """

    def __init__(self, path: str, max_bytes: int, max_backups: int = 5, max_age_days: float = 7,
                 compress: bool = True, *, clock: Callable[[], float] = time.time):
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.max_age_days = max_age_days
        self.compress = compress
        self.clock = clock
        self.folder = os.path.dirname(os.path.abspath(path))
        base = os.path.basename(path)
        stem, ext = os.path.splitext(base)
        self.prefix, self.ext = stem + "-", ext
        self.fd: int | None = None
        self.size = 0
        self._check_at = 0.0
        self._torn = False
        self._last_backup = 0  # milliseconds in the newest backup's name
        self._mill_lock = threading.Lock()
        self._mill_thread: threading.Thread | None = None
        self._mill_pending = False

    # --- the writer thread's side ---------------------------------------------------------------

    def write(self, lines: Sequence[bytes]) -> None:
        """Append the lines, rotating first whenever the next part would pass max_bytes."""
        if self.fd is not None and self.clock() >= self._check_at:
            self._check_path()
        if self.fd is None:
            self._open()
        total = sum(map(len, lines))
        if self.size + total <= self.max_bytes and len(lines) <= FEW_ENTRIES:
            # The usual batch, no rotation: a write per queue entry (each whole lines), not a copy of all.
            for entry in lines:
                self._append(entry)
            return
        part: list[bytes] = []
        part_size = 0
        for line in lines:
            if part and self.size + part_size + len(line) > self.max_bytes:
                self._append(b"".join(part))
                part, part_size = [], 0
            if not part and self.size and self.size + len(line) > self.max_bytes:
                self.rotate()
            part.append(line)
            part_size += len(line)
            if part_size >= MAX_WRITE:
                self._append(b"".join(part))
                part, part_size = [], 0
        if part:
            self._append(b"".join(part))

    def _append(self, data: bytes) -> None:
        assert self.fd is not None
        if self._torn:  # end the line a failed write left half written
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                done = os.write(self.fd, view)
                self.size += done
                self._torn = data[len(data) - len(view) + done - 1] != 10  # not at a line's end
                view = view[done:]
        except OSError:
            self._close_fd()  # opened afresh on the next write
            raise

    def _check_path(self) -> None:
        """Once a second: if the file was moved or deleted under us, write to a new one."""
        self._check_at = self.clock() + 1.0
        assert self.fd is not None
        try:
            same = os.path.samestat(os.stat(self.path), os.fstat(self.fd))
        except OSError:
            same = False
        if not same:
            self._close_fd()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self._check_at = self.clock() + 1.0
        self.start_mill()  # backups an earlier run left uncompressed or too old

    def _close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def rotate(self) -> None:
        """Move the current file aside as a backup and start a new one."""
        self._close_fd()
        if os.path.exists(self.path):
            os.rename(self.path, self._backup_name(self.clock()))
        self._open()

    def _backup_name(self, now: float) -> str:
        # Rotations within one millisecond take the next ones: names never repeat, nor go back in time.
        millis = self._last_backup = max(int(now * 1000), self._last_backup + 1)
        while True:
            stamp = datetime.fromtimestamp(millis / 1000, UTC).strftime(BACKUP_TIME_FORMAT) + f".{millis % 1000:03d}"
            name = os.path.join(self.folder, f"{self.prefix}{stamp}{self.ext}")
            if not os.path.exists(name) and not os.path.exists(name + ".gz"):
                return name
            millis = self._last_backup = millis + 1

    def maintain(self) -> None:
        """Prune by age even when nothing rotates (called now and then by the writer)."""
        self.start_mill()

    def close(self) -> None:
        self._close_fd()
        with self._mill_lock:
            thread = self._mill_thread
        if thread is not None:
            thread.join()

    # --- backups ---------------------------------------------------------------------------------

    def backups(self) -> list[tuple[float, str]]:
        """(time in the name, file name) of every backup, newest first; a backup's plain and
        gzipped forms (an interrupted compression) appear as one, the gzipped one."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        found: dict[float, str] = {}
        for name in names:
            if not name.startswith(self.prefix):
                continue
            if name.endswith(self.ext + ".gz"):
                stamp = name[len(self.prefix):len(name) - len(self.ext) - 3]
            elif name.endswith(self.ext):
                stamp = name[len(self.prefix):len(name) - len(self.ext)] if self.ext else name[len(self.prefix):]
            else:
                continue
            when = _backup_time(stamp)
            if when is not None and (when not in found or name.endswith(".gz")):
                found[when] = name
        return sorted(found.items(), reverse=True)

    def start_mill(self) -> None:
        """Compress and prune the backups on the helper thread (again, if it is running)."""
        with self._mill_lock:
            self._mill_pending = True
            if self._mill_thread is not None:
                return
            self._mill_thread = threading.Thread(target=self._mill_loop, name="log-compress", daemon=True)
            self._mill_thread.start()

    def _mill_loop(self) -> None:
        while True:
            with self._mill_lock:
                if not self._mill_pending:
                    self._mill_thread = None
                    return
                self._mill_pending = False
            try:
                self.mill()
            except Exception:  # noqa: BLE001 - a failed compression must not stop the next one
                log.exception("log backups of %s could not be compressed or pruned", self.path)

    def mill(self) -> None:
        """Compress the plain backups (when compress is on), then delete what is past the limits."""
        if self.compress:
            for _, name in self.backups():
                if not name.endswith(".gz"):
                    self._compress(os.path.join(self.folder, name))
        for _, name in self.backups():
            plain = os.path.join(self.folder, name)
            if name.endswith(".gz") and os.path.exists(plain[:-3]):
                os.unlink(plain[:-3])  # compressed, the plain form left by an interruption
        cutoff = self.clock() - self.max_age_days * 86400 if self.max_age_days > 0 else None
        for index, (when, name) in enumerate(self.backups()):
            if (self.max_backups > 0 and index >= self.max_backups) or (cutoff is not None and when < cutoff):
                _unlink(os.path.join(self.folder, name))

    def _compress(self, source: str) -> None:
        target = source + ".gz"
        partial = target + ".partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as raw, \
                    gzip.GzipFile(filename=os.path.basename(source), mode="wb", fileobj=raw, compresslevel=1) as out:
                shutil.copyfileobj(src, out, 1 << 18)  # below the mmap threshold (server.tune_malloc)
            os.replace(partial, target)
        except BaseException:
            _unlink(partial)
            raise
        os.unlink(source)


def _backup_time(stamp: str) -> float | None:
    try:
        return datetime.strptime(stamp, BACKUP_TIME_FORMAT + ".%f").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BackgroundWriter:
    """Lines queued by one producer thread (the event loop) and written by a thread of its own.

    Bounded by `max_lines` and `max_bytes` queued; a line that does not fit is dropped and counted
    (`dropped`), as is every line of a write that failed. `close()` writes what is queued first.
    """

    def __init__(self, sink: Sink, *, max_lines: int = 8192, max_bytes: int = 64 << 20, what: str = "log",
                 name: str = "log-writer"):
        self.sink = sink
        self.what = what
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.queue: collections.deque[tuple[bytes, int]] = collections.deque()  # (lines, how many)
        self.queued_bytes = 0         # written by the producer only
        self.done_bytes = 0           # written by the writer thread only: written or dropped
        self.overflowed = 0           # producer: lines that did not fit in the queue
        self.failed = 0               # writer thread: lines of writes that failed
        self.written = 0              # writer thread: lines written
        self.last_error = ""
        self._sleeping = False
        self._closing = False
        # Rung (one item) to wake the thread: a C queue, where a threading.Event's wait and set
        # run its Condition's Python code at every wake-up, which come at each batch of lines.
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines lost: the queue was full, or the sink refused them."""
        return self.overflowed + self.failed

    def put(self, line: bytes) -> bool:
        """Queue one line (False: dropped). Never blocks."""
        queue = self.queue
        if len(queue) >= self.max_lines or self.queued_bytes - self.done_bytes >= self.max_bytes:
            self.overflowed += 1
            return False
        queue.append((line, 1))
        self.queued_bytes += len(line)
        if self._sleeping:
            self._sleeping = False
            self._wake.put(None)
        return True

    def put_run(self, pieces: list[bytes], lines: int) -> None:
        """Queue the concatenation of `pieces`, `lines` whole lines, written together; past the
        bounds they are all dropped. Joined RUN_PIECES at a time: a whole batch (a busy tenth of
        a second) would pass the 1 MiB above which malloc maps fresh pages (server.tune_malloc),
        whose page faults cost more than making the lines."""
        if not pieces:
            return
        if len(self.queue) >= self.max_lines or self.queued_bytes - self.done_bytes >= self.max_bytes:
            self.overflowed += lines
            return
        join, append = b"".join, self.queue.append
        starts = range(0, len(pieces), RUN_PIECES)
        final = starts[-1]
        for at in starts:  # the run's lines counted with its last part
            part = join(pieces[at:at + RUN_PIECES])
            append((part, lines if at == final else 0))
            self.queued_bytes += len(part)
        if self._sleeping:
            self._sleeping = False
            self._wake.put(None)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line queued so far is written or dropped (False: timed out)."""
        target = self.queued_bytes
        deadline = time.monotonic() + timeout
        self._wake.put(None)
        while self.done_bytes < target:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.002)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the thread and close the sink; later lines are dropped."""
        self.max_lines = 0
        self._closing = True
        self._wake.put(None)
        self._thread.join(timeout)

    # --- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        retry_at = 0.0
        maintain_at = time.monotonic() + MAINTAIN_EVERY
        reported, report_at = 0, 0.0
        while True:
            batch, lines, size = self._take()
            now = time.monotonic()
            if batch:
                if now < retry_at:
                    self._fail(lines, size)
                else:
                    try:
                        self.sink.write(batch)
                        self.written += lines
                        self.done_bytes += size
                    except Exception as error:  # noqa: BLE001 - the writer must outlive any failure
                        self.last_error = f"{type(error).__name__}: {error}"
                        self._fail(lines, size)
                        retry_at = now + RETRY_OPEN
            if self.dropped > reported and now >= report_at:
                log.warning("%s: %d lines dropped (%d with the queue full, %d not written; last error: %s)",
                            self.what, self.dropped - reported, self.overflowed, self.failed, self.last_error or "none")
                reported, report_at = self.dropped, now + DROP_REPORT_EVERY
            if now >= maintain_at:
                maintain_at = now + MAINTAIN_EVERY
                self._quietly(self.sink.maintain)
            queued = len(self.queue)
            if queued and (self._closing or queued >= self.max_lines // 2):
                continue  # falling behind (or closing): write again at once
            if self._closing:
                self._quietly(self.sink.close)
                return
            self._sleeping = True
            if not self.queue:  # a line that came before the flag was set is taken now
                try:
                    self._wake.get(timeout=1.0)
                except queue.Empty:
                    pass
            self._sleeping = False

    def _take(self) -> tuple[list[bytes], int, int]:
        """What is queued, at most MAX_BATCH entries (the producer may append meanwhile): the
        entries, their lines and their bytes."""
        pop = self.queue.popleft
        entries = [pop() for _ in range(min(len(self.queue), MAX_BATCH))]
        batch = [data for data, _ in entries]
        return batch, sum(lines for _, lines in entries), sum(map(len, batch))

    def _fail(self, lines: int, size: int) -> None:
        self.failed += lines
        self.done_bytes += size

    def _quietly(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # noqa: BLE001
            self.last_error = f"{type(error).__name__}: {error}"
