"""`fastproxy kubeconfig` as a process, read back by the real kubectl, used through the real gateway."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from tests.e2e.test_kubectl_through_gateway import KUBECTL, stack  # noqa: F401  (the gateway and the simulated cluster)

pytestmark = pytest.mark.e2e

# A kubeconfig someone already has: another cluster, unknown fields, preferences, a current context.
EXISTING = """\
apiVersion: v1
kind: Config
preferences:
  colors: true
clusters:
- name: kind-dev
  cluster:
    server: https://127.0.0.1:1
    extensions:
    - name: client.authentication.k8s.io/exec
      extension: {audience: kind}
users:
- name: kind-dev
  user: {token: kind-token}
contexts:
- name: kind-dev
  context: {cluster: kind-dev, user: kind-dev, namespace: work}
current-context: kind-dev
"""


def fastproxy_kubeconfig(env, *args, input=None):
    return subprocess.run([sys.executable, "-m", "fastproxy", "kubeconfig", *args], env=env, input=input,
                          capture_output=True, text=True, timeout=30)


def kubectl(env, *args):
    result = subprocess.run([KUBECTL, "--request-timeout=15s", *args], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture
def written(stack, tmp_path):  # noqa: F811
    """An environment whose $KUBECONFIG lists a file holding EXISTING first, and the gateway's address."""
    state, _, _ = stack
    first, second = tmp_path / "config", tmp_path / "other"
    first.write_text(EXISTING)
    first.chmod(0o644)
    env = {**os.environ, "KUBECONFIG": f"{first}{os.pathsep}{second}", "HOME": str(tmp_path)}
    listen = yaml.safe_load((state / "kubeconfig").read_text())["clusters"][0]["cluster"]["server"].split("/")[2]
    return env, first, second, state, f"https://{listen}"


def test_written_contexts_work_with_kubectl_through_the_gateway(written):
    env, first, second, state, server = written
    ca, key_file = str(state / "gateway-tls" / "ca.crt"), str(state / "admin.key")
    cluster = fastproxy_kubeconfig(env, "--server", server, "--cluster", "demo", "--key-file", key_file,
                                   "--certificate-authority", ca)
    assert cluster.returncode == 0, cluster.stderr
    key = (state / "admin.key").read_text()
    management = fastproxy_kubeconfig(env, "--server", server, "--management", "--certificate-authority", ca, input=key)
    assert management.returncode == 0, management.stderr
    assert key.strip() not in cluster.stdout + cluster.stderr + management.stdout + management.stderr
    assert not second.exists(), "only the first file of $KUBECONFIG is written"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600

    contexts = kubectl(env, "config", "get-contexts", "-o", "name").split()
    assert sorted(contexts) == ["kind-dev", "loft-management", "loft_demo"]
    view = json.loads(kubectl(env, "config", "view", "--raw", "-o", "json"))
    assert view["current-context"] == "loft-management"
    assert view["preferences"] == {"colors": True}
    clusters = {c["name"]: c["cluster"] for c in view["clusters"]}
    assert clusters["kind-dev"]["extensions"][0]["extension"] == {"audience": "kind"}
    assert clusters["loft_demo"]["server"] == f"{server}/kubernetes/cluster/demo"
    assert "insecure-skip-tls-verify" not in clusters["loft_demo"]

    names = kubectl(env, "--context", "loft_demo", "get", "namespaces", "-o", "name").split()
    assert "namespace/team-a" in names
    who = json.loads(kubectl(env, "--context", "loft_demo", "auth", "whoami", "-o", "json"))
    assert who["status"]["userInfo"]["username"] == "admin"
    assert kubectl(env, "get", "clusters", "-o", "name").split() == ["cluster.management.loft.sh/demo"]  # current: management


def test_running_again_replaces_its_own_entries(written):
    env, first, _, state, server = written
    for key in ("first-key", "second-key"):
        result = fastproxy_kubeconfig(env, "--server", server, "--cluster", "demo",
                                      "--virtual-cluster", "team-a/dev", "--insecure-skip-tls-verify", "--key", key)
        assert result.returncode == 0, result.stderr
    view = json.loads(kubectl(env, "config", "view", "--raw", "-o", "json"))
    name = "loft-vcluster_dev_team-a_demo"
    for section in ("clusters", "users", "contexts"):
        assert sorted(entry["name"] for entry in view[section]) == ["kind-dev", name]
    assert {u["name"]: u["user"] for u in view["users"]}[name] == {"token": "second-key"}
    cluster = {c["name"]: c["cluster"] for c in view["clusters"]}[name]
    assert cluster == {"server": f"{server}/kubernetes/virtualcluster/demo/team-a/dev", "insecure-skip-tls-verify": True}
    assert kubectl(env, "config", "current-context").strip() == name


@pytest.mark.parametrize("args, message", [
    (["--server", "http://gw", "--cluster", "a", "--key", "k"], "--server: must be an https://HOST[:PORT] URL"),
    (["--server", "https://gw", "--cluster", "a", "--key-file", "/nonexistent"], "--key-file: /nonexistent: No such file"),
    (["--server", "https://gw", "--cluster", "a", "--key", "k", "--certificate-authority", "/etc/hostname"],
     "--certificate-authority: /etc/hostname: holds no PEM certificate"),
    (["--server", "https://gw", "--cluster", "a", "--key", "k", "--certificate-authority", "/etc/hostname",
      "--insecure-skip-tls-verify"], "--insecure-skip-tls-verify: cannot be combined"),
    (["--server", "https://gw", "--cluster", "a"], "standard input (no --key-file or --key): must not be empty"),
])
def test_a_bad_flag_is_one_line_and_leaves_the_file_alone(written, args, message):
    env, first, *_ = written
    result = fastproxy_kubeconfig(env, *args, input="")
    assert result.returncode == 2
    assert result.stderr.startswith(f"fastproxy: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert first.read_text() == EXISTING


def test_a_file_that_is_not_yaml_is_refused(written):
    env, first, *_ = written
    first.write_text("clusters: [\n")
    result = fastproxy_kubeconfig(env, "--server", "https://gw", "--cluster", "a", "--key", "k")
    assert result.returncode == 2 and result.stderr.startswith(f"fastproxy: KUBECONFIG: {first}: not YAML")
    assert result.stderr.count("\n") == 1 and first.read_text() == "clusters: [\n"


def test_the_file_kubectl_is_writing_is_left_alone(written):
    env, first, *_ = written
    lock = first.parent / "config.lock"
    lock.touch()  # what kubectl holds while it modifies the file
    kubectl_refused = subprocess.run([KUBECTL, "config", "set-context", "x"], env=env, capture_output=True, text=True)
    assert kubectl_refused.returncode != 0 and "config.lock" in kubectl_refused.stderr, "kubectl honours the same lock"
    result = fastproxy_kubeconfig(env, "--server", "https://gw", "--cluster", "a", "--key", "k")
    assert result.returncode == 2 and result.stderr.startswith(f"fastproxy: KUBECONFIG: {lock} exists")
    assert first.read_text() == EXISTING and lock.exists()
    lock.unlink()
    assert fastproxy_kubeconfig(env, "--server", "https://gw", "--cluster", "a", "--key", "k").returncode == 0
    assert not lock.exists(), "the lock is released"
