"""A gateway on etcd reports losing it: /metrics' fastproxy_state_store_failing_workers and /readyz's
keys check while a relay to etcd is cut, both back when it is restored; the static keys go on working."""
from __future__ import annotations

import textwrap
import time

from tests.etcd import Link as Relay
from tests.helpers import start_gateway
from tests.observe.test_metrics_gateway import ADMIN, gateway_text, sample, scrape
from tests.rawhttp import Client


def eventually(read, want, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"{what}: {got!r}, not {want!r}"
        time.sleep(0.2)
    return got


def test_a_gateway_cut_off_from_etcd_says_so_and_recovers(gateway_config, etcd, tmp_path, tls_files):
    relay = Relay(etcd.client_ports[0])
    folder, text = gateway_text(gateway_config, tmp_path, textwrap.dedent(f"""
        [state]
        backend = "etcd"
        endpoints = ["{relay.endpoint}"]
        prefix = "/gateway-link/"
        timeout = 0.5
        max_staleness = 0
    """))
    gateway = start_gateway(text, folder)
    ca = tls_files["ca"]

    def failing() -> float:
        return sample(scrape(gateway.port, ca, ADMIN), "fastproxy_state_store_failing_workers")

    def ready() -> int:
        client = Client(gateway.port, ca)
        try:
            client.request("GET", "/readyz?verbose")
            answer = client.response()
            return answer.status if (answer.status == 200) == (b"[+]keys ok" in answer.body) else -1
        finally:
            client.close()
    try:
        eventually(failing, 0.0, "a gateway reading etcd")
        relay.cut()
        eventually(failing, 1.0, "the worker serving from its last snapshot")
        assert eventually(ready, 500, "readiness while etcd is out of reach") == 500
        relay.restore()
        eventually(failing, 0.0, "the worker current again")
        eventually(ready, 200, "readiness once etcd is back")
    finally:
        gateway.stop()
        relay.close()
