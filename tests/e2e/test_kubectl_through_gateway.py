"""The real kubectl, through the gateway, against the simulated cluster: every verb users rely on."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time

import pytest

from devcluster.process import start_devcluster
from fastproxy.demo import VIEWER_RULES, prepare
from tests.helpers import start_gateway

KUBECTL = "/usr/bin/kubectl"
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("e2e")
    cluster = start_devcluster(state / "cluster", rules=VIEWER_RULES)
    gateway = None
    try:
        config = prepare(state, cluster.url, cluster.ca_file, cluster.gateway_token_file, f"127.0.0.1:{free_port()}")
        gateway = start_gateway(config.read_text(), state)
        env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig"), "HOME": str(state)}
        yield state, env, cluster
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def kubectl(env, *args, input=None, check=True, timeout=20, context="admin"):
    result = subprocess.run([KUBECTL, "--context", context, "--request-timeout=15s", *args],
                            env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def read_line(process, timeout: float) -> str:
    """The next stdout line of a running process, without Python's buffering hiding lines from select."""
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending = getattr(process, "pending_output", b"")
    while b"\n" not in pending:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no output within {timeout}s"
        data = os.read(fd, 65536)
        assert data, "the process closed its output"
        pending += data
    line, _, process.pending_output = pending.partition(b"\n")
    return line.decode() + "\n"


def test_get(stack):
    _, env, _ = stack
    names = kubectl(env, "get", "namespaces", "-o", "name").stdout.split()
    assert {"namespace/default", "namespace/team-a", "namespace/team-b"} <= set(names)
    pods = json.loads(kubectl(env, "get", "pods", "-A", "-o", "json").stdout)
    assert "web-5d4f8c7b9-h7k2m" in [p["metadata"]["name"] for p in pods["items"]]


def test_auth_whoami_is_the_access_keys_user(stack):
    _, env, _ = stack
    admin = json.loads(kubectl(env, "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert admin["username"] == "admin" and "system:masters" in admin["groups"]
    viewer = json.loads(kubectl(env, "auth", "whoami", "-o", "json", context="viewer").stdout)["status"]["userInfo"]
    assert viewer["username"] == "viewer" and "demo:viewers" in viewer["groups"]


def test_as_flag_does_not_make_anyone_admin(stack):
    _, env, _ = stack
    result = kubectl(env, "--as", "system:admin", "--as-group", "system:masters", "get", "secrets",
                     context="viewer", check=False)
    assert result.returncode != 0 and "Forbidden" in result.stderr
    # Refused by the gateway's impersonation check, not by RBAC on the viewer's own request (what a
    # gateway ignoring --as would give); kubectl shows a refused discovery as "unknown", --raw does not.
    raw = kubectl(env, "--as", "system:admin", "--as-group", "system:masters", "get", "--raw",
                  "/kubernetes/cluster/demo/api/v1/namespaces/team-a/secrets", context="viewer", check=False)
    assert raw.returncode != 0 and "user 'viewer' may not impersonate users 'system:admin'" in raw.stderr


def test_the_demos_impersonation_hints_hold(stack):
    """What `fastproxy demo` prints: the viewer may not impersonate, the admin key may."""
    _, env, _ = stack
    refused = kubectl(env, "--as", "system:admin", "get", "--raw", "/kubernetes/cluster/demo/api/v1/namespaces/team-a/pods",
                      context="viewer", check=False)
    assert refused.returncode != 0 and "user 'viewer' may not impersonate users 'system:admin'" in refused.stderr
    jane = json.loads(kubectl(env, "--as", "jane", "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert jane["username"] == "jane"


def test_restricted_key_is_forbidden_outside_its_rules(stack):
    _, env, _ = stack
    assert "web-5d4f8c7b9-h7k2m" in kubectl(env, "get", "pods", "-n", "team-a", context="viewer").stdout
    for args in (("get", "secrets", "-n", "team-a"), ("get", "pods", "-n", "team-b"),
                 ("delete", "configmap", "app-config", "-n", "team-a")):
        result = kubectl(env, *args, context="viewer", check=False)
        assert result.returncode == 1 and 'User "viewer" cannot' in result.stderr, result.stderr


def test_create_apply_delete(stack, tmp_path):
    _, env, _ = stack
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: e2e-applied\n  namespace: team-b\n"
                        "data:\n  colour: blue\n")
    assert "created" in kubectl(env, "apply", "--validate=false", "-f", str(manifest)).stdout
    manifest.write_text(manifest.read_text().replace("blue", "green"))
    assert "configured" in kubectl(env, "apply", "--validate=false", "-f", str(manifest)).stdout
    got = json.loads(kubectl(env, "get", "configmap", "e2e-applied", "-n", "team-b", "-o", "json").stdout)
    assert got["data"] == {"colour": "green"}
    kubectl(env, "create", "configmap", "e2e-created", "-n", "team-b", "--from-literal=a=b")
    assert "deleted" in kubectl(env, "delete", "configmap", "e2e-created", "e2e-applied", "-n", "team-b").stdout
    missing = kubectl(env, "get", "configmap", "e2e-applied", "-n", "team-b", check=False)
    assert missing.returncode == 1 and "NotFound" in missing.stderr


def test_watch_sees_another_clients_change(stack):
    _, env, _ = stack
    watch = subprocess.Popen([KUBECTL, "--context", "admin", "get", "configmaps", "-n", "team-b", "-w",
                              "--output-watch-events", "-o", "custom-columns=EVENT:.type,NAME:.object.metadata.name"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(watch, 10).split() == ["EVENT", "NAME"]
        assert read_line(watch, 5).split() == ["ADDED", "app-config"]
        # Created after the list: the watch (from the list's resourceVersion) streams it as it happens.
        kubectl(env, "create", "configmap", "e2e-watched", "-n", "team-b")
        assert read_line(watch, 10).split() == ["ADDED", "e2e-watched"]
    finally:
        watch.kill()
        watch.wait()
        kubectl(env, "delete", "configmap", "e2e-watched", "-n", "team-b", check=False)


def test_logs_follow_streams(stack):
    _, env, _ = stack
    follow = subprocess.Popen([KUBECTL, "--context", "admin", "logs", "-f", "--tail=2", "web-5d4f8c7b9-h7k2m",
                               "-n", "team-a"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The last two lines of the backlog, then a line the container writes while kubectl follows.
        lines = [read_line(follow, 10) for _ in range(3)]
        assert lines == [f"web-5d4f8c7b9-h7k2m/nginx: log line {n}\n" for n in (9, 10, 11)], lines
        assert follow.poll() is None  # still following
    finally:
        follow.kill()
        follow.wait()


def test_exec(stack):
    _, env, _ = stack
    assert kubectl(env, "exec", "web-5d4f8c7b9-h7k2m", "-n", "team-a", "--", "echo", "hi").stdout == "hi\n"
    echoed = kubectl(env, "exec", "-i", "web-5d4f8c7b9-h7k2m", "-n", "team-a", "--", "cat", input="line one\nline two\n")
    assert echoed.stdout == "line one\nline two\n"
    failed = kubectl(env, "exec", "web-5d4f8c7b9-h7k2m", "-n", "team-a", "--", "sh", "-c", "exit 3", check=False)
    assert failed.returncode == 3


def test_exec_over_spdy(stack):
    _, env, _ = stack
    spdy_env = {**env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    assert kubectl(spdy_env, "exec", "web-5d4f8c7b9-h7k2m", "-n", "team-a", "--", "echo", "over", "spdy").stdout == "over spdy\n"


@pytest.mark.parametrize("websockets", ["true", "false"])
def test_port_forward_carries_bytes(stack, websockets):
    _, env, _ = stack
    port = free_port()
    forward = subprocess.Popen([KUBECTL, "--context", "admin", "port-forward", "-n", "team-a",
                                "pod/web-5d4f8c7b9-h7k2m", f"{port}:80"],
                               env={**env, "KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Forwarding from 127.0.0.1" in read_line(forward, 10)
        assert_echoed(port, b"through the gateway\n" * 1000)
    finally:
        forward.kill()
        forward.wait()


def assert_echoed(port: int, payload: bytes) -> None:
    """A forwarded port (the simulated pods' echo service) gives back every byte sent to it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "port-forward closed early"
            received += chunk
        assert received == payload


def test_python_client_watch_through_the_gateway(stack):
    state, env, _ = stack
    from kubernetes import client, config, watch
    api_client = config.new_client_from_config(str(state / "kubeconfig"), context="viewer")
    v1 = client.CoreV1Api(api_client)
    stream = watch.Watch().stream(v1.list_namespaced_config_map, "team-a", timeout_seconds=5)
    first = next(stream)
    assert first["type"] == "ADDED" and first["object"].metadata.namespace == "team-a"
    api_client.close()
