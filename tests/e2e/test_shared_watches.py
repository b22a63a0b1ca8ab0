"""Shared upstream watch streams through the real gateway process and the simulated cluster:
the streams are counted at the cluster (its established connections), events at each client."""
from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import KUBECTL, free_port, kubectl, read_line
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e
WATCH = f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-b/configmaps?watch=1"
HISTORY = 50  # changes the simulated cluster keeps for watches; older versions get 410
WATCH_LIMIT = 12  # [limits] watches_per_identity: above what the other tests hold at once


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("shared-watch")
    cluster = start_devcluster(state / "cluster", rules=VIEWER_RULES, verbose=True, watch_history=HISTORY)
    gateway = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        config = prepare(state, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)
        text = config.read_text() + (  # shared watches are on by default
            f"\n[limits]\nwatches_per_identity = {WATCH_LIMIT}\nretry_after = 2\n")
        gateway = start_gateway(text, state)
        env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig"), "HOME": str(state)}
        yield state, env, cluster, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def cluster_api(cluster, method: str, path: str, body: dict | None = None) -> dict:
    """A request straight to the simulated cluster as its admin (changes the watches then see)."""
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    request = urllib.request.Request(cluster.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {cluster.admin_token}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())


def create_configmap(cluster, name: str, data: str = "") -> dict:
    return cluster_api(cluster, "POST", "/api/v1/namespaces/team-b/configmaps",
                       {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"d": data}})


def delete_configmap(cluster, name: str) -> None:
    cluster_api(cluster, "DELETE", f"/api/v1/namespaces/team-b/configmaps/{name}")


class Watch:
    """One client's watch over its own TLS connection, read event by event."""

    def __init__(self, stack, query: str = "", *, path: str = WATCH, key: str = "admin", wait: bool = True):
        """`wait`: read the response head now; else the caller calls `began` when it wants to."""
        state, _, _, gateway = stack
        context = ssl.create_default_context(cafile=str(state / "gateway-tls" / "ca.crt"))
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10),
                                        server_hostname="localhost")
        token = (state / f"{key}.key").read_text().strip()
        self.sock.sendall(f"GET {path}{query} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                          "Accept: application/json\r\n\r\n".encode())
        self.buffer = bytearray()  # appended to in place: a slow reader gets many small pieces
        if wait:
            self.began()

    def began(self) -> None:
        head = self._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"chunked" in head.lower()

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(bytes(self.buffer))
            self.buffer += data

    def _until(self, mark: bytes) -> bytes:
        while (at := self.buffer.find(mark)) < 0:
            self._fill(len(self.buffer) + 1)
        found = bytes(self.buffer[:at])
        del self.buffer[:at + len(mark)]
        return found

    def next(self) -> dict | None:
        """The next event, or None at the chunked terminator (the stream ended cleanly)."""
        size = int(self._until(b"\r\n"), 16)
        if size == 0:
            assert self._until(b"\r\n") == b""
            return None
        self._fill(size + 2)
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size + 2]
        return json.loads(chunk)

    def named(self) -> tuple[str, str]:
        event = self.next()
        assert event is not None
        return event["type"], event["object"]["metadata"]["name"]

    def close(self) -> None:
        self.sock.close()


def upstream_watches(cluster, query: str = "watch=") -> int:
    """Configmap watches the simulated cluster has served (its access log records each at its end),
    those whose query holds `query`."""
    log = (cluster.directory / "devcluster.log").read_text()
    return sum(1 for line in log.splitlines() if "/configmaps?" in line and "watch=" in line and query in line)


def settle(count_of, expected: int, timeout: float = 8) -> int:
    deadline = time.monotonic() + timeout
    while count_of() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count_of()


def test_clients_share_one_upstream_stream_and_each_gets_every_event_once(stack):
    _, env, cluster, _ = stack
    before = upstream_watches(cluster)
    watches = [Watch(stack) for _ in range(4)]
    try:
        for watch in watches:
            assert watch.named() == ("ADDED", "app-config")
        for name in ("shared-1", "shared-2"):
            kubectl(env, "create", "configmap", name, "-n", "team-b")
        kubectl(env, "annotate", "configmap", "shared-1", "-n", "team-b", "seen=yes")
        for watch in watches:
            assert [watch.named() for _ in range(3)] == [("ADDED", "shared-1"), ("ADDED", "shared-2"),
                                                         ("MODIFIED", "shared-1")]
        # A joiner without a version gets the current objects as ADDED, then the live events.
        late = Watch(stack)
        assert sorted(late.named() for _ in range(3)) == [("ADDED", "app-config"), ("ADDED", "shared-1"),
                                                          ("ADDED", "shared-2")]
        kubectl(env, "delete", "configmap", "shared-2", "-n", "team-b")
        for watch in [*watches, late]:
            assert watch.named() == ("DELETED", "shared-2")
        watches.append(late)
    finally:
        for watch in watches:
            watch.close()
        kubectl(env, "delete", "configmap", "shared-1", "-n", "team-b", "--ignore-not-found")
    # The last subscriber gone, the stream lingers and then ends: one upstream watch in all.
    assert settle(lambda: upstream_watches(cluster), before + 1) == before + 1


def test_a_joiner_from_an_old_version_gets_its_own_stream(stack):
    _, env, cluster, _ = stack
    before = upstream_watches(cluster)
    first = Watch(stack)
    old = None
    try:
        assert first.named() == ("ADDED", "app-config")
        old = Watch(stack, "&resourceVersion=1")  # before anything the shared stream holds
        kubectl(env, "create", "configmap", "own-stream", "-n", "team-b")
        assert first.named() == ("ADDED", "own-stream")
        events = []
        while not events or events[-1] != ("ADDED", "own-stream"):
            events.append(old.named())
        assert events.count(("ADDED", "own-stream")) == 1
    finally:
        first.close()
        if old is not None:
            old.close()
        kubectl(env, "delete", "configmap", "own-stream", "-n", "team-b", "--ignore-not-found")
    assert settle(lambda: upstream_watches(cluster), before + 2) == before + 2


def refused_watch(stack, *, path: str = WATCH, key: str = "admin", headers: str = "") -> tuple[bytes, dict]:
    """A watch expected to be refused: (its head, its Status); `headers`: more lines, each ending CRLF."""
    state, _, _, gateway = stack
    context = ssl.create_default_context(cafile=str(state / "gateway-tls" / "ca.crt"))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10),
                             server_hostname="localhost") as sock:
        token = (state / f"{key}.key").read_text().strip()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{headers}"
                     "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_each_subscriber_of_a_shared_stream_counts_against_the_watch_limit(stack):
    _, _, cluster, _ = stack
    before = upstream_watches(cluster)
    watches = [Watch(stack) for _ in range(WATCH_LIMIT)]
    try:
        head, status = refused_watch(stack)
        assert head.startswith(b"HTTP/1.1 429") and b"\r\nRetry-After: 2\r\n" in head, head
        assert "(limits.watches_per_identity = 12)" in status["message"] and status["reason"] == "TooManyRequests"
        watches.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the gateway sees the client leave and gives its place back
            try:
                watches.append(Watch(stack))
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the subscriber that left kept its place"
                time.sleep(0.1)
    finally:
        for watch in watches:
            watch.close()
    assert settle(lambda: upstream_watches(cluster), before + 1) == before + 1  # all of them on one stream


def test_timeout_ends_one_client_alone(stack):
    _, env, cluster, _ = stack
    short, long = Watch(stack, "&timeoutSeconds=1"), Watch(stack)
    try:
        assert short.named() == ("ADDED", "app-config")
        assert long.named() == ("ADDED", "app-config")
        started = time.monotonic()
        assert short.next() is None  # the chunked terminator: a clean end
        assert 0.5 < time.monotonic() - started < 3
        kubectl(env, "create", "configmap", "after-timeout", "-n", "team-b")
        assert long.named() == ("ADDED", "after-timeout")
    finally:
        short.close()
        long.close()
        kubectl(env, "delete", "configmap", "after-timeout", "-n", "team-b", "--ignore-not-found")


def test_bookmarks_only_for_clients_that_asked(stack):
    asked, plain = Watch(stack, "&allowWatchBookmarks=true"), Watch(stack)
    try:
        assert asked.named() == ("ADDED", "app-config")
        assert plain.named() == ("ADDED", "app-config")
        event = asked.next()  # the simulated cluster sends one every 2 s on an idle watch
        assert event is not None and event["type"] == "BOOKMARK"
        plain.sock.settimeout(1)
        with pytest.raises(TimeoutError):
            plain.next()
    finally:
        asked.close()
        plain.close()


def test_two_kubectl_watches_share_one_stream(stack):
    _, env, cluster, _ = stack
    before = upstream_watches(cluster)
    command = [KUBECTL, "--context", "admin", "get", "configmaps", "-n", "team-b", "-w", "--output-watch-events",
               "-o", "custom-columns=EVENT:.type,NAME:.object.metadata.name"]
    watches = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        for watch in watches:
            assert read_line(watch, 10).split() == ["EVENT", "NAME"]
            assert read_line(watch, 5).split() == ["ADDED", "app-config"]
        kubectl(env, "create", "configmap", "kubectl-shared", "-n", "team-b")
        for watch in watches:
            assert read_line(watch, 10).split() == ["ADDED", "kubectl-shared"]
    finally:
        for watch in watches:
            watch.kill()
            watch.wait()
        kubectl(env, "delete", "configmap", "kubectl-shared", "-n", "team-b", "--ignore-not-found")
    # kubectl lists, then watches from the list's version: the same one for both here.
    assert settle(lambda: upstream_watches(cluster), before + 1) == before + 1


def test_a_slow_client_is_ended_alone(stack):
    _, _, cluster, _ = stack
    slow, fast = Watch(stack), Watch(stack)
    names = [f"big-{i}" for i in range(12)]
    try:
        assert fast.named() == ("ADDED", "app-config")
        # The slow client reads nothing more while ~12 MB of events go out, more than the
        # kernel's socket buffers and the gateway's write buffer bound hold together.
        for name in names:
            create_configmap(cluster, name, "x" * 1_000_000)
            assert fast.named() == ("ADDED", name)
        create_configmap(cluster, "after-slow")
        assert fast.named() == ("ADDED", "after-slow")
        # What the gateway had taken for the slow client still arrives, then a clean end.
        seen = []
        while (event := slow.next()) is not None:
            seen.append(event["object"]["metadata"]["name"])
        assert seen[0] == "app-config" and seen[1:] == names[:len(seen) - 1] and len(seen) < len(names)
    finally:
        slow.close()
        fast.close()
        for name in [*names, "after-slow"]:
            delete_configmap(cluster, name)


def test_an_expired_version_reaches_every_subscriber_from_one_upstream_stream(stack):
    _, _, cluster, _ = stack
    for i in range(HISTORY + 1):  # push the oldest versions out of the cluster's history
        create_configmap(cluster, f"churn-{i}")
        delete_configmap(cluster, f"churn-{i}")
    version = "resourceVersion=2"  # asked by no other test, so its upstream watches are these
    assert upstream_watches(cluster, version + " ") == 0

    def expired(watch: Watch) -> None:
        watch.began()
        event = watch.next()
        assert event is not None and event["type"] == "ERROR" and event["object"]["code"] == 410
        assert watch.next() is None  # the upstream ended: every stream ends cleanly

    # Opened together: they join the stream while it opens, or get what it learned.
    together = [Watch(stack, "&" + version, wait=False) for _ in range(3)]
    late = None
    try:
        for watch in together:
            expired(watch)
        # Once the stream has ended, a joiner at that version gets the cluster's answer too.
        late = Watch(stack, "&" + version, wait=False)
        expired(late)
    finally:
        for watch in [*together, *([late] if late else [])]:
            watch.close()
    # The cluster logs a watch once it has ended; a second one, were there one, shows within the second.
    assert settle(lambda: upstream_watches(cluster, version + " "), 2, timeout=1) == 1
