"""One devcluster process for the session, a kubeconfig for it, and clients: the real kubectl
and a small HTTPS client for what kubectl does not show (status codes, watch lines)."""
from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devcluster import DevCluster, start_devcluster

KUBECTL = shutil.which("kubectl")
BOB_TOKEN = "bob-secret-token"
CAROL_TOKEN = "carol-secret-token"
# bob may read pods and their logs in team-a only; carol has no rules beyond the built-in ones.
RULES = [
    {"users": ["bob"], "verbs": ["get", "list", "watch"], "resources": ["pods", "pods/log"],
     "namespaces": ["team-a"]},
    {"users": ["bob"], "verbs": ["get"], "apiGroups": ["storage.loft.sh"], "resources": ["virtualclusters"],
     "namespaces": ["vcluster-a"]},
]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> DevCluster:
    directory = tmp_path_factory.mktemp("devcluster")
    with start_devcluster(directory, rules=RULES,
                          tokens={BOB_TOKEN: ("bob", ["dev"]), CAROL_TOKEN: ("carol", [])}) as running:
        yield running
    assert running.process.returncode == 0, running.log_file.read_text()


@dataclass
class Api:
    """Plain HTTPS requests to the devcluster, as a given bearer token."""
    cluster: DevCluster

    def connection(self, timeout: float = 10, *, client_cert: tuple[Path, Path] | None = None
                   ) -> http.client.HTTPSConnection:
        url = urlsplit(self.cluster.url)
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        if client_cert:
            context.load_cert_chain(*client_cert)
        return http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=timeout)

    def headers(self, token: str | None, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = "admin",
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        token = self.cluster.admin_token if token == "admin" else token
        headers = self.headers(token, headers)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn = self.connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            is_json = response.getheader("Content-Type", "").startswith("application/json")
            return response.status, json.loads(raw) if is_json else raw.decode()
        finally:
            conn.close()

    def watch(self, path: str, *, token: str | None = "admin", timeout: float = 5) -> WatchStream:
        token = self.cluster.admin_token if token == "admin" else token
        conn = self.connection(timeout)
        conn.request("GET", path, headers=self.headers(token, None))
        return WatchStream(conn, conn.getresponse())


@dataclass
class WatchStream:
    conn: http.client.HTTPSConnection
    response: http.client.HTTPResponse

    def next_event(self) -> dict[str, Any] | None:
        """The next event, or None at the end of the stream; the connection's timeout applies."""
        line = self.response.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="session")
def api(cluster) -> Api:
    return Api(cluster)


@pytest.fixture(scope="session")
def bob_token() -> str:
    return BOB_TOKEN


@pytest.fixture
def api_for():
    """Makes an Api for a devcluster a test starts itself."""
    return Api


@dataclass
class Kubectl:
    home: Path
    kubeconfig: Path

    def command(self, args: tuple[str, ...], user: str) -> list[str]:
        return [KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--context={user}",
                f"--cache-dir={self.home / 'cache'}", "--request-timeout=10s", *args]

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}

    def __call__(self, *args: str, user: str = "admin", check: bool = True,
                 timeout: float = 20) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(args, user), capture_output=True, text=True,
                                timeout=timeout, env=self.env())
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def background(self, *args: str, user: str = "admin") -> LineReader:
        process = subprocess.Popen(self.command(args, user), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=self.env())
        return LineReader(process)


class LineReader:
    """A running kubectl whose output lines can be awaited with a timeout."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout}s") from None
        if line is None:
            raise AssertionError(f"kubectl ended: {self.process.stderr.read()}")
        return line

    def lines(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        return [self.next_line(max(deadline - time.monotonic(), 0.01)) for _ in range(count)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture(scope="session")
def kubectl(cluster, tmp_path_factory) -> Kubectl:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    home = tmp_path_factory.mktemp("kubectl-home")
    tokens = {"admin": cluster.admin_token, "bob": BOB_TOKEN, "carol": CAROL_TOKEN,
              "stranger": "not-a-known-token"}
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "admin",
        "clusters": [{"name": "dev", "cluster": {"server": cluster.url,
                                                  "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": user, "user": {"token": token}} for user, token in tokens.items()],
        "contexts": [{"name": user, "context": {"cluster": "dev", "user": user, "namespace": "default"}}
                     for user in tokens],
    }
    path = home / "kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    return Kubectl(home, path)
