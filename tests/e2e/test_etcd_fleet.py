"""A fleet on one etcd: three gateway processes of two workers each, `[state] backend = "etcd"`.

A key created through the CLI of one gateway is accepted by every worker of all three; revoked
through another, it is refused by all; and a revocation reaches every worker within a second (p99
over 100 revocations). Each gateway is probed over eight kept-alive connections, which SO_REUSEPORT
spreads over its two workers (all eight on one worker: p < 1 %), so every worker answers."""
from __future__ import annotations

import http.client
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from fastproxy.store.etcd import EtcdStore
from tests.e2e.test_kubectl_through_gateway import free_port
from tests.etcd import EtcdCluster
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e

GATEWAYS, CONNECTIONS = 3, 8
PROBE = f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-a/configmaps"


def cli(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fastproxy", *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


class Fleet:
    def __init__(self, configs: list[Path], ports: list[int], ca: str, etcd: EtcdCluster, prefix: str):
        self.configs, self.etcd, self.prefix = configs, etcd, prefix
        context = ssl.create_default_context(cafile=ca)
        self.connections = [http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
                            for port in ports for _ in range(CONNECTIONS)]

    def answers(self, key: str) -> list[int]:
        """The status every probe connection gets for a request with `key`."""
        codes = []
        for connection in self.connections:
            connection.request("GET", PROBE, headers={"Authorization": f"Bearer {key}"})
            response = connection.getresponse()
            response.read()
            codes.append(response.status)
        return codes

    def wait_for(self, key: str, code: int, timeout: float = 10.0) -> float:
        """Seconds until every worker answers `code` for `key`."""
        started = time.monotonic()
        while set(self.answers(key)) != {code}:
            assert time.monotonic() - started < timeout, f"not every worker answers {code}: {self.answers(key)}"
        return time.monotonic() - started

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    etcd = EtcdCluster(folder / "etcd")
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    gateways = []
    try:
        base = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, "127.0.0.1:0").read_text()
        for relative in ("signing-keys", "admin.key", "viewer.key"):
            base = base.replace(f'"{relative}"', f'"{folder / relative}"')
        endpoints = ", ".join(f'"{endpoint}"' for endpoint in etcd.endpoints)
        base = base.replace('[state]\npath = "state.db"',
                            f'[state]\nbackend = "etcd"\nendpoints = [{endpoints}]\nprefix = "/fleet/"\ntimeout = 2')
        assert 'backend = "etcd"' in base
        ports, configs = [], []
        for number in range(GATEWAYS):
            port = free_port()
            gateway_folder = folder / f"gateway-{number}"
            gateway_folder.mkdir()
            text = base.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"\nworkers = 2')
            gateways.append(start_gateway(text, gateway_folder))
            ports.append(port)
            configs.append(gateway_folder / "fastproxy.toml")
        cli(configs[0], "user", "create", "jane", "--group", "demo:viewers")
        fleet = Fleet(configs, ports, str(folder / "gateway-tls" / "ca.crt"), etcd, "/fleet/")
        yield fleet
        fleet.close()
    finally:
        for gateway in gateways:
            gateway.stop()
        cluster.stop()
        etcd.stop()


def test_a_key_created_on_one_gateway_works_on_all_and_revoked_on_another_is_refused_by_all(fleet):
    out = cli(fleet.configs[0], "accesskey", "create", "--user", "jane", "--name", "jane-laptop")
    key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key: "))
    fleet.wait_for(key, 200)
    assert "jane-laptop" in cli(fleet.configs[2], "accesskey", "list")
    cli(fleet.configs[1], "accesskey", "revoke", "jane-laptop")
    fleet.wait_for(key, 401)


def test_a_revocation_reaches_every_worker_within_a_second(fleet):
    from fastproxy.config import EtcdConfig
    admin = EtcdStore(EtcdConfig(fleet.etcd.endpoints, fleet.prefix))
    try:
        keys = [admin.create_access_key(user="jane", name=f"key-{number}")[1] for number in range(100)]
        fleet.wait_for(keys[-1], 200)
        took = []
        for number, key in enumerate(keys):
            started = time.monotonic()
            admin.revoke_access_key(f"key-{number}")
            fleet.wait_for(key, 401)
            took.append(time.monotonic() - started)
    finally:
        admin.close()
    p50, p99 = statistics.median(took), statistics.quantiles(took, n=100)[98]
    print(f"revocation reaches all {GATEWAYS * 2} workers: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {max(took) * 1000:.0f} ms over {len(took)}")
    assert p99 < 1.0
