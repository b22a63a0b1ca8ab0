"""Real etcd members (Debian's etcd-server) for the tests: loopback, free ports, temporary data folders."""
from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from pathlib import Path

from fastproxy.config import EtcdConfig


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class EtcdCluster:
    """`size` members of one etcd cluster; `kill(i)` and `start(i)` stop and bring back member i (its data kept)."""

    def __init__(self, folder: Path, size: int = 1):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * size)
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports, self.peer_ports = ports[:size], ports[size:]
        self.initial = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in zip(self.names, self.peer_ports))
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        for index in range(size):
            self.start(index, wait=False)
        for index in range(size):
            self.wait_ready(index)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"http://127.0.0.1:{port}" for port in self.client_ports)

    def config(self, prefix: str = "/test/", **settings: float) -> EtcdConfig:
        return EtcdConfig(self.endpoints, prefix, **{"timeout": 1.0, **settings})  # type: ignore[arg-type]

    def start(self, index: int, wait: bool = True) -> None:
        name, client, peer = self.names[index], self.client_ports[index], self.peer_ports[index]
        log = open(self.folder / f"{name}.log", "ab")
        self.processes[index] = subprocess.Popen(
            ["etcd", "--name", name, "--data-dir", str(self.folder / name),
             "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", self.initial, "--initial-cluster-state", "new",
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=log, stderr=log)
        if wait:
            self.wait_ready(index)

    def wait_ready(self, index: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.client_ports[index], timeout=1)
                connection.request("GET", "/health")
                if b'"true"' in connection.getresponse().read():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd member {index} is not healthy: {(self.folder / f'{self.names[index]}.log').read_text()[-2000:]}")

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None:
            process.kill()
            process.wait()
            self.processes[index] = None

    def stop(self) -> None:
        for index in range(len(self.names)):
            self.kill(index)


class Link:
    """A TCP relay on loopback to an etcd member that a test can cut (every connection closed, new
    ones refused) and restore: a gateway cut off from an etcd that goes on working."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.open = True
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            # Checked and registered under the lock cut() holds: a connection accepted while cut()
            # runs would otherwise miss its list and outlive the cut (the reader never noticing it).
            with self.lock:
                admitted = self.open
                if admitted:
                    self.connections += [client, upstream]
            if not admitted:
                client.close()
                upstream.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.open = False
            connections, self.connections = self.connections, []
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()
