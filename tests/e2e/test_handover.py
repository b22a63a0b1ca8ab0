"""Upgrade hand-over: a client connecting every 10 ms while one gateway process replaces
another on the same listening socket sees no refused connection."""
from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

from fastproxy.handover import passing_socket
from tests.helpers import start_gateway


class ConnectingClient:
    """Connects every 10 ms (TCP, TLS, GET /livez) and records what went wrong."""

    def __init__(self, port: int, ca: Path):
        self.port = port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.answered = 0
        self.failures: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                        self.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := tls.recv(4096):
                        answer += chunk
                if answer.startswith(b"HTTP/1.1 200 "):
                    self.answered += 1
                else:
                    self.failures.append(f"answer {answer[:40]!r}")
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)

    def stop(self) -> None:
        self.running = False
        self.thread.join(10)


def folder_for(gateway_config, tmp_path: Path, name: str) -> tuple[Path, str]:
    source, text = gateway_config
    folder = tmp_path / name
    folder.mkdir()
    for file in ("token", "key"):
        (folder / file).write_text((source / file).read_text())
    return folder, text.replace('[server]\n', f'[server]\npid_file = "{folder / "fastproxy.pid"}"\n', 1)


def test_socket_activation_hands_the_socket_from_process_to_process(gateway_config, tmp_path, tls_files):
    # The test is the service manager here: it holds the socket, as fastproxy.socket does.
    holder = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = holder.getsockname()[1]
    old_folder, text = folder_for(gateway_config, tmp_path, "old")
    new_folder, _ = folder_for(gateway_config, tmp_path, "new")
    old = start_gateway(text, old_folder, wrapper=tuple(passing_socket([])), stdin=holder.fileno())
    client = ConnectingClient(port, tls_files["ca"])
    try:
        assert old.port == port and "socket passed in" in old.log.read_text()
        time.sleep(0.5)
        new = start_gateway(text, new_folder, wrapper=tuple(passing_socket([])), stdin=holder.fileno())
        try:
            old.popen.send_signal(signal.SIGTERM)
            assert old.popen.wait(15) == 0
            time.sleep(0.5)
            client.stop()
            assert client.failures == [] and client.answered > 30, (client.failures, client.answered)
        finally:
            new.stop()
    finally:
        client.stop()
        old.stop()
        holder.close()


def test_sigusr2_starts_a_successor_on_the_same_socket(gateway_config, tmp_path, tls_files):
    folder, text = folder_for(gateway_config, tmp_path, "gateway")
    old = start_gateway(text, folder)
    pid_file = folder / "fastproxy.pid"
    client = ConnectingClient(old.port, tls_files["ca"])
    successor = None
    try:
        time.sleep(0.5)
        assert pid_file.read_text().strip() == str(old.popen.pid)
        old.popen.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 15
        while old.log.read_text().count("listening on") < 2:  # the successor logs to the same stderr
            assert time.monotonic() < deadline, old.log.read_text()
            time.sleep(0.05)
        successor = int(pid_file.read_text())
        assert successor != old.popen.pid
        old.popen.send_signal(signal.SIGTERM)
        assert old.popen.wait(15) == 0
        assert pid_file.read_text().strip() == str(successor)  # the old one leaves the new one's pid
        time.sleep(0.5)
        client.stop()
        assert client.failures == [] and client.answered > 30, (client.failures, client.answered)
        assert f"(1 worker, pid {successor}, socket passed in)" in old.log.read_text()
    finally:
        client.stop()
        old.stop()
        if successor is not None:
            os.kill(successor, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while Path(f"/proc/{successor}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
