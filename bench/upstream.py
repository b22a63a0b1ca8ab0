"""The fake Kubernetes API server every target proxies to: nginx in front, the stream server behind.

nginx (one worker, pinned to the load CPU) answers the small GET itself from a file and forwards the
LIST and watch requests over a unix socket to bench/stream_server.py. It listens plain (the
"direct" target) and TLS with HTTP/2 offered, as a real API server does.
"""
from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .processes import LOAD_CPU, Process, free_port, wait_until_ready

SMALL_PATH = "/api/v1/namespaces/default/configmaps/small"
LIST_PATH = "/api/v1/configmaps"
WATCH_PATH = "/api/v1/namespaces/default/configmaps?watch=true"
# watch-same: the resources many clients watch alike ({resource}: which one); stream_server.SAME_PREFIX
WATCH_SAME_PATH = "/api/v1/namespaces/bench-same/configmaps?watch=true&labelSelector=group%3D{resource}"
TLS_NAME = "localhost"  # nginx checks proxied certificates by DNS name, not IP


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, shared by every listener."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))

    def certificate(subject: str, public_key, issuer: str, signing_key, extensions) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate(
        "fastproxy bench CA", ca_key.public_key(), "fastproxy bench CA", ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = certificate(
        TLS_NAME, server_key.public_key(), "fastproxy bench CA", ca_key,
        [
            (x509.SubjectAlternativeName(
                [x509.DNSName(TLS_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def nginx_preamble(prefix: Path, max_open_files: int) -> str:
    """Settings shared by both nginx instances: one worker, everything under the temp prefix."""
    # A root master would drop its worker to "nobody", which cannot enter the 0700 temp dir.
    run_as = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    return (
        f"{run_as}worker_processes 1;\nworker_rlimit_nofile {max_open_files};\npid {prefix}/nginx.pid;\n"
        f"events {{ worker_connections {max_open_files - 64}; }}\n"
    )


def start_nginx(name: str, config: str, prefix: Path, cpu: int, log_dir: Path) -> Process:
    prefix.mkdir(parents=True, exist_ok=True)
    config_path = prefix / "nginx.conf"
    config_path.write_text(config)
    return Process(
        name,
        ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config_path), "-g", "daemon off;"],
        cpu,
        log_dir,
    )


class Upstream:
    def __init__(self, workdir: Path, tls: TlsFiles, list_mb: float, watch_events_per_second: float,
                 max_open_files: int):
        self.plain_port, self.tls_port = free_port(), free_port()
        self.tls = tls
        self.watch_events_per_second = watch_events_per_second
        prefix = workdir / "upstream"
        prefix.mkdir()
        socket_path = prefix / "stream.sock"
        (prefix / "small.json").write_bytes(small_configmap())
        self.stream_server = Process(
            "stream-server",
            [sys.executable, "-m", "bench.stream_server", "--socket", str(socket_path), "--list-mb", str(list_mb),
             "--watch-events-per-second", str(watch_events_per_second)],
            LOAD_CPU,
            workdir,
        )
        config = nginx_preamble(prefix, max_open_files) + f"""
http {{
    access_log off;
    keepalive_requests 10000000;  # proxies keep their upstream connections for a whole run
    keepalive_timeout 600s;
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    upstream stream_server {{
        server unix:{socket_path};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{self.plain_port} backlog=4096;
        listen 127.0.0.1:{self.tls_port} ssl http2 backlog=4096;
        location = {SMALL_PATH} {{
            default_type application/json;
            alias {prefix}/small.json;
        }}
        location / {{
            proxy_pass http://stream_server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_buffer_size 16k;  # with buffering off: the largest chunk passed on
            proxy_buffers 4 16k;
            proxy_read_timeout 1h;
            send_timeout 1h;
        }}
    }}
}}
"""
        self.nginx = start_nginx("upstream-nginx", config, prefix, LOAD_CPU, workdir)
        try:
            wait_until_ready(self.nginx, f"http://127.0.0.1:{self.plain_port}{SMALL_PATH}")
            # Building the LIST body takes a moment; nginx answers 502 until the socket exists.
            wait_until_ready(self.stream_server, f"http://127.0.0.1:{self.plain_port}/healthz-probe?watch=0",
                             timeout=60, expect_status=404)
            self.list_bytes = self._checked_list_bytes()
        except BaseException:
            self.stop()
            raise

    def _checked_list_bytes(self) -> int:
        """The LIST must really be chunked; its decoded size is what every proxy must deliver."""
        fetched = subprocess.run(
            ["curl", "-sS", "--http1.1", "-D", "-", "-o", "/dev/null", "-w", "%{size_download}",
             self.url(tls=False) + LIST_PATH],
            capture_output=True, text=True, check=True,
        )
        if "transfer-encoding: chunked" not in fetched.stdout.lower():
            raise RuntimeError(f"the upstream LIST is not chunked:\n{fetched.stdout}")
        return int(fetched.stdout.rsplit("\n", 1)[-1])

    def url(self, tls: bool) -> str:
        return f"https://127.0.0.1:{self.tls_port}" if tls else f"http://127.0.0.1:{self.plain_port}"

    def watch_same_streams(self, events_per_second: float) -> int:
        """Watch-same streams opened since the last call; from now on, events_per_second per resource."""
        url = f"http://127.0.0.1:{self.plain_port}/bench/watch-same?rate={events_per_second:g}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)["opened"]

    def stop(self) -> None:
        self.nginx.stop()
        self.stream_server.stop()


def small_configmap() -> bytes:
    """The ~1 KB answer to the small GET."""
    return json.dumps(
        {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": "small",
                "namespace": "default",
                "uid": "0f1d2c3b-4a59-6877-8695-a4b3c2d1e0f9",
                "resourceVersion": "421337",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app.kubernetes.io/name": "bench", "app.kubernetes.io/part-of": "fastproxy"},
                "annotations": {"bench.fastproxy.io/purpose": "small GET latency and throughput"},
            },
            "data": {"settings.yaml": "log-level: info\nfeatures: " + "x" * 560},
        },
        separators=(",", ":"),
    ).encode()
