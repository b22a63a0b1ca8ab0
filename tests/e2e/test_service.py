"""`fastproxy serve` as systemd runs it: the notify protocol on a real datagram socket
($NOTIFY_SOCKET), the watchdog, reload and drain, driven by signals to the real process."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ACCESS_KEY, start_gateway
from tests.rawhttp import Client

BASE = "/kubernetes/cluster/one"
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}


class NotifySocket:
    """The service manager's end: a bound AF_UNIX datagram socket recording what arrives, when."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.env = address.decode().replace("\0", "@", 1) if isinstance(address, bytes) else address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def with_field(self, name: str, since: float = 0.0, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(at, fields) for at, fields in self.messages
                    if name in fields and at >= since and value in (None, fields[name])]

    def wait_for(self, name: str, since: float = 0.0, timeout: float = 10.0,
                 value: str | None = None) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.with_field(name, since, value)
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no {name}= within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    yield notify
    notify.close()


def service_folder(gateway_config, tmp_path: Path, server_lines: str = "") -> tuple[Path, str]:
    folder, text = gateway_config
    own = tmp_path / "gateway"
    own.mkdir()
    for name in ("token", "key"):
        (own / name).write_text((folder / name).read_text())
    return own, text.replace("[server]\n", "[server]\n" + server_lines, 1)


def worker_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_two_workers_notify_ready_status_reload_watchdog_and_stopping(gateway_config, tmp_path, tls_files, notify_socket):
    folder, text = service_folder(gateway_config, tmp_path, "workers = 2\n")
    # Workers report once a second; the supervisor pings each second while all reported within 2 s.
    gateway = start_gateway(text, folder, env={"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "4000000"})
    ca = tls_files["ca"]
    try:
        # READY=1 comes once both workers listen: at once, every connection is taken, by both.
        notify_socket.wait_for("READY")
        for _ in range(30):
            client = Client(gateway.port, ca)
            client.request("GET", "/livez")
            assert client.response().status == 200
            client.close()
        log_text = gateway.log.read_text()
        assert log_text.count("listening on") == 1 and "exited" not in log_text

        # STATUS= counts the connections and watches of both workers.
        watcher = Client(gateway.port, ca)
        watcher.request("GET", f"{BASE}/api/v1/namespaces/dev/pods?watch=1&interval=0.05&serve=watch", AUTH)
        watch = watcher.head()
        watcher.feed_until(lambda: len(watch.chunks) >= 2, "events")
        notify_socket.wait_for("STATUS", value="2 workers, 1 connections, 1 watches")

        # Pings every second (a quarter of WATCHDOG_USEC) while both loops run...
        time.sleep(2.5)
        pings = [at for at, _ in notify_socket.with_field("WATCHDOG", time.monotonic() - 2.5)]
        assert len(pings) >= 2
        # ...and none while one worker's loop is frozen; they resume when it runs again.
        frozen = worker_pids(gateway.popen.pid)[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            time.sleep(2.2)  # the last report it made goes stale after two seconds
            silent_from = time.monotonic()
            time.sleep(2.0)
            assert notify_socket.with_field("WATCHDOG", silent_from) == []
        finally:
            os.kill(frozen, signal.SIGCONT)
        notify_socket.wait_for("WATCHDOG", time.monotonic(), timeout=3)

        # SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 once both workers reloaded.
        before = time.monotonic()
        gateway.popen.send_signal(signal.SIGHUP)
        at, fields = notify_socket.wait_for("RELOADING", before)
        assert abs(int(fields["MONOTONIC_USEC"]) / 1e6 - at) < 1.0
        ready_at, _ = notify_socket.wait_for("READY", at)
        assert gateway.log.read_text().count("reloaded") == 2  # each worker
        seen = len(watch.chunks)
        watcher.feed_until(lambda: len(watch.chunks) > seen + 2, "events after the reload")  # the watch carries on

        watcher.close()
        stop = time.monotonic()
        gateway.popen.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", stop)
        assert gateway.popen.wait(10) == 0
    finally:
        gateway.stop()


def test_one_worker_notifies_an_abstract_socket(gateway_config, tmp_path, tls_files):
    notify = NotifySocket(f"\0fastproxy-test-{os.getpid()}".encode())
    folder, text = service_folder(gateway_config, tmp_path)
    try:
        gateway = start_gateway(text, folder, env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "2000000"})
        try:
            notify.wait_for("READY")
            notify.wait_for("WATCHDOG")
            assert notify.wait_for("STATUS")[1]["STATUS"].startswith("1 worker, ")
            before = time.monotonic()
            gateway.popen.send_signal(signal.SIGHUP)
            notify.wait_for("RELOADING", before)
            notify.wait_for("READY", before)
            # A frozen loop sends nothing.
            os.kill(gateway.popen.pid, signal.SIGSTOP)
            silent_from = time.monotonic() + 0.05
            time.sleep(1.5)
            os.kill(gateway.popen.pid, signal.SIGCONT)
            assert not [at for at, _ in notify.with_field("WATCHDOG", silent_from) if at < silent_from + 1.4]
            gateway.popen.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING", before)
            assert gateway.popen.wait(10) == 0
        finally:
            gateway.stop()
    finally:
        notify.close()
    assert re.search(r"listening on https://127\.0\.0\.1:\d+ \(1 worker", gateway.log.read_text())


def test_health_endpoints_list_their_checks(gateway, tls_files):
    client = Client(gateway.port, tls_files["ca"])
    try:
        for path, body in (("/livez", "ok"), ("/readyz", "ok"), ("/healthz", "ok"),
                           ("/livez?verbose", "[+]ping ok\nlivez check passed\n"),
                           ("/readyz?verbose", "[+]ping ok\n[+]keys ok\n[+]clusters ok\n[+]shutdown ok\nreadyz check passed\n"),
                           ("/healthz?verbose", "[+]ping ok\n[+]keys ok\n[+]clusters ok\nhealthz check passed\n")):
            client.request("GET", path)
            response = client.response()
            assert (response.status, response.body.decode()) == (200, body), path
            assert ("Cache-Control", "no-store") in response.headers
    finally:
        client.close()
