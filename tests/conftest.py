"""Fixtures that start real processes: a TLS test upstream and the gateway in front of it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trustme

from tests.helpers import ACCESS_KEY, start_gateway, start_server

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca, tmp_path_factory):
    """CA bundle plus a server certificate for 127.0.0.1 / localhost."""
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(files["cert"], append=True)
    cert.private_key_pem.write_to_path(files["key"])
    return files


@pytest.fixture(scope="session")
def upstream(tls_files):
    process = start_server([sys.executable, str(HERE / "upstream_server.py"), str(tls_files["cert"]), str(tls_files["key"])])
    yield process
    process.popen.kill()
    process.popen.wait()


@pytest.fixture(scope="session")
def gateway_config(tls_files, upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gateway")
    (folder / "token").write_text("gateway-credential-for-upstream\n")
    (folder / "key").write_text(ACCESS_KEY + "\n")
    return folder, f"""
        [server]
        listen = "127.0.0.1:0"
        tls_cert_file = "{tls_files['cert']}"
        tls_key_file = "{tls_files['key']}"
        header_timeout = 2
        max_body_bytes = 100000000

        [[clusters]]
        name = "one"
        server = "https://127.0.0.1:{upstream.port}"
        ca_file = "{tls_files['ca']}"
        token_file = "token"
        response_header_timeout = 3

        [[clusters]]
        name = "down"
        server = "https://127.0.0.1:1"
        ca_file = "{tls_files['ca']}"
        token_file = "token"

        [[access_keys]]
        name = "alice-key"
        key_file = "key"
        user = "alice"
        groups = ["dev", "ops"]
    """


@pytest.fixture(scope="session")
def gateway(gateway_config):
    folder, text = gateway_config
    process = start_gateway(text, folder)
    yield process
    process.stop()
