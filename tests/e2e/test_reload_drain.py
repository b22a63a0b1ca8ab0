"""Reload (SIGHUP, `fastproxy reload`) and drain (SIGTERM) of the real `fastproxy serve` process,
with real TLS clients, watches streaming from the test upstream, and the upstream seeing what
the gateway sends."""
from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tests.helpers import ACCESS_KEY, start_gateway
from tests.rawhttp import Client

AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}
WATCH = "/api/v1/namespaces/dev/pods?watch=1&interval=0.05&serve=watch"


def config_text(folder: Path, tls: tuple[Path, Path], ca: Path, upstream_port: int, *, token: str = "token",
                clusters: tuple[str, ...] = ("one", "two"), server: str = "") -> str:
    blocks = "".join(f"""
        [[clusters]]
        name = "{name}"
        server = "https://127.0.0.1:{upstream_port}"
        ca_file = "{ca}"
        token_file = "{token}"
    """ for name in clusters)
    return textwrap.dedent(f"""
        [server]
        listen = "127.0.0.1:0"
        tls_cert_file = "{tls[0]}"
        tls_key_file = "{tls[1]}"
        pid_file = "{folder / 'fastproxy.pid'}"
        watch_termination_period = 1
        {server}
    """) + textwrap.dedent(blocks) + textwrap.dedent("""
        [[access_keys]]
        name = "alice-key"
        key_file = "key"
        user = "alice"
        groups = ["dev"]
    """)


def serving_cert(ca, folder: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = folder / f"{name}.crt", folder / f"{name}.key"
    paths[0].write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(paths[1])
    return paths


def peer_cert(port: int, ca: Path) -> bytes:
    client = Client(port, ca)
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        return client.sock.getpeercert(binary_form=True)
    finally:
        client.close()


def echo(port: int, ca: Path, cluster: str) -> tuple[int, dict]:
    client = Client(port, ca)
    try:
        client.request("GET", f"/kubernetes/cluster/{cluster}/api/v1/echo", AUTH)
        response = client.response()
        return response.status, json.loads(response.body)
    finally:
        client.close()


def open_watch(port: int, ca: Path, cluster: str) -> tuple[Client, object]:
    client = Client(port, ca, timeout=10)
    client.request("GET", f"/kubernetes/cluster/{cluster}{WATCH}", AUTH)
    watch = client.head()
    client.feed_until(lambda: len(watch.chunks) >= 2, "events")
    return client, watch


def more_events(client: Client, watch, what: str) -> None:
    """The watch goes on streaming: a few more events arrive."""
    seen = len(watch.chunks)
    client.feed_until(lambda: len(watch.chunks) > seen + 3, what)
    client.close()


def read_until_closed(client: Client) -> float:
    """Read a stream until the gateway ends it; the time it ended."""
    try:
        while client.read_some():
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic()


def reload_command(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastproxy", "reload", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


def setup(tmp_path: Path, gateway_config, ca) -> tuple[Path, tuple[Path, Path]]:
    """The gateway's folder with its token, key and serving certificate, and a second token."""
    folder = tmp_path / "gateway"
    folder.mkdir()
    source, _ = gateway_config
    for name in ("token", "key"):
        (folder / name).write_text((source / name).read_text())
    (folder / "token2").write_text("rotated-credential\n")
    return folder, serving_cert(ca, folder, "tls")


def test_reload_takes_a_new_credential_certificate_and_cluster_list(gateway_config, tmp_path, ca, tls_files, upstream):
    folder, old_tls = setup(tmp_path, gateway_config, ca)
    ca_file = tls_files["ca"]
    gateway = start_gateway(config_text(folder, old_tls, ca_file, upstream.port, server="workers = 2"), folder)
    config = folder / "fastproxy.toml"
    try:
        kept, kept_watch = open_watch(gateway.port, ca_file, "one")
        removed, _ = open_watch(gateway.port, ca_file, "two")
        before_cert = peer_cert(gateway.port, ca_file)
        assert echo(gateway.port, ca_file, "one")[1]["headers"].count(["Authorization", "Bearer gateway-credential-for-upstream"]) == 1

        new_tls = serving_cert(ca, folder, "new")
        config.write_text(config_text(folder, new_tls, ca_file, upstream.port, token="token2", clusters=("one",),
                                      server="workers = 2"))
        result = reload_command(config)
        assert result.returncode == 0, result.stderr
        asked = time.monotonic()
        deadline = time.monotonic() + 10
        while gateway.log.read_text().count("reloaded ") < 2:
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.05)

        # New connections: the new certificate; new upstream requests: the new credential.
        assert peer_cert(gateway.port, ca_file) not in (before_cert, b"")
        for _ in range(6):  # both workers
            status, seen = echo(gateway.port, ca_file, "one")
            assert status == 200
            assert [v for k, v in seen["headers"] if k == "Authorization"] == ["Bearer rotated-credential"]
            assert echo(gateway.port, ca_file, "two")[0] == 404
        # The removed cluster's watch ends within the termination period; the other goes on.
        ended = read_until_closed(removed)
        assert ended - asked < 1 + 2.0
        more_events(kept, kept_watch, "events after the reload")
    finally:
        gateway.stop()


def test_a_bad_or_impossible_reload_changes_nothing(gateway_config, tmp_path, ca, tls_files, upstream):
    folder, tls = setup(tmp_path, gateway_config, ca)
    ca_file = tls_files["ca"]
    good = config_text(folder, tls, ca_file, upstream.port, server="workers = 2")
    gateway = start_gateway(good, folder)
    config = folder / "fastproxy.toml"
    try:
        watcher, watch = open_watch(gateway.port, ca_file, "two")
        # A bad value: `fastproxy reload` names the key and signals nobody.
        config.write_text(good.replace("watch_termination_period = 1", "watch_termination_period = -1"))
        result = reload_command(config)
        assert result.returncode == 2
        assert result.stderr.strip() == "fastproxy: server.watch_termination_period: must be >= 0, not -1.0"
        # The same file by SIGHUP: one line (the supervisor checks it for both workers).
        gateway.popen.send_signal(signal.SIGHUP)
        # A new listening address needs a restart.
        time.sleep(0.3)
        config.write_text(good.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"'))
        gateway.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while gateway.log.read_text().count("reload refused") < 2:
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.05)
        refusals = [line for line in gateway.log.read_text().splitlines() if "reload refused" in line]
        assert len(refusals) == 2
        assert refusals[0].endswith("reload refused, the running configuration stays: "
                                    "server.watch_termination_period: must be >= 0, not -1.0")
        assert refusals[1].endswith("server.listen: changed from 127.0.0.1:0 to 127.0.0.1:1; "
                                    "a new listening address needs a restart")
        # Still serving both clusters on the old configuration, the watch untouched.
        assert echo(gateway.port, ca_file, "two")[0] == 200
        more_events(watcher, watch, "events after the refusals")
    finally:
        gateway.stop()


def test_drain_spreads_watch_ends_and_lets_requests_finish(gateway_config, tmp_path, ca, tls_files, upstream):
    folder, tls = setup(tmp_path, gateway_config, ca)
    ca_file = tls_files["ca"]
    period = 2.0
    gateway = start_gateway(config_text(folder, tls, ca_file, upstream.port, clusters=("one",),
                                        server=f"shutdown_grace = 5\nwatch_termination_period = {period}")
                            .replace("watch_termination_period = 1\n", "", 1), folder)
    try:
        watchers = [open_watch(gateway.port, ca_file, "one")[0] for _ in range(8)]
        ends: list[float] = []
        threads = [threading.Thread(target=lambda c=c: ends.append(read_until_closed(c))) for c in watchers]
        for thread in threads:
            thread.start()
        slow = Client(gateway.port, ca_file, timeout=10)
        slow.request("GET", "/kubernetes/cluster/one/api/v1/slow?delay=1.0", AUTH)
        slow.request("GET", "/readyz?verbose")  # pipelined: answered after the slow one, mid-drain
        time.sleep(0.2)
        term = time.monotonic()
        gateway.popen.send_signal(signal.SIGTERM)
        assert slow.response().status == 200  # the request in flight finishes
        ready = slow.response()
        assert ready.status == 503
        assert ready.body.decode().splitlines()[-2:] == ["[-]shutdown failed: draining", "readyz check failed"]
        code = gateway.popen.wait(period + 5)
        exited = time.monotonic() - term
        for thread in threads:
            thread.join(5)
        offsets = sorted(end - term for end in ends)
        assert len(offsets) == 8
        # Evenly over the period: the first near period/8, the last near the period.
        assert 0.1 < offsets[0] < 0.8 and period - 0.4 < offsets[-1] < period + 1.0, offsets
        assert code == 0 and exited < period + 2.0
        slow.close()
    finally:
        gateway.stop()


def test_reload_under_load_ends_no_watch_and_fails_no_request(gateway_config, tmp_path, ca, tls_files, upstream):
    """200 watches open and a GET loop running while the credential and the serving certificate
    change by SIGHUP: no GET fails, every watch goes on, new requests carry the new credential."""
    folder, old_tls = setup(tmp_path, gateway_config, ca)
    ca_file = tls_files["ca"]
    gateway = start_gateway(config_text(folder, old_tls, ca_file, upstream.port, clusters=("one",), server="workers = 2"),
                            folder)
    watchers = []
    try:
        for _ in range(200):
            client = Client(gateway.port, ca_file, timeout=10)
            client.request("GET", f"/kubernetes/cluster/one{WATCH.replace('interval=0.05', 'interval=0.5')}", AUTH)
            watchers.append((client, client.head()))
        credentials: list[str] = []
        failures: list[str] = []
        running = True

        def load() -> None:
            while running:
                try:
                    status, seen = echo(gateway.port, ca_file, "one")
                    if status != 200:
                        failures.append(str(status))
                    credentials.append(next(v for k, v in seen["headers"] if k == "Authorization"))
                except (OSError, ValueError) as exc:
                    failures.append(repr(exc))
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        before_cert = peer_cert(gateway.port, ca_file)
        new_tls = serving_cert(ca, folder, "new")
        (folder / "fastproxy.toml").write_text(config_text(folder, new_tls, ca_file, upstream.port, token="token2",
                                                           clusters=("one",), server="workers = 2"))
        gateway.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while gateway.log.read_text().count("reloaded ") < 2:
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        running = False
        loader.join(10)
        assert failures == [] and len(credentials) > 10, failures
        assert credentials[0] == "Bearer gateway-credential-for-upstream" and credentials[-1] == "Bearer rotated-credential"
        assert peer_cert(gateway.port, ca_file) != before_cert
        # Every watch streams on: each receives events after the reload.
        for client, watch in watchers:
            seen = len(watch.chunks)
            client.feed_until(lambda watch=watch, seen=seen: len(watch.chunks) > seen, "an event after the reload")
    finally:
        for client, _ in watchers:
            client.close()
        gateway.stop()
