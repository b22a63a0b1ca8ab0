"""The status page in a running gateway (in process, real sockets and TLS): its observer notes
refusals, and a watch counts in its clusters' gauges. (Off, it is not there at all:
tests/observe/test_metrics_gateway.py's test_disabled_metrics_cost_nothing.)"""
from __future__ import annotations

import time

import orjson

from tests.helpers import ACCESS_KEY
from tests.inprocess import InProcessGateway
from tests.observe.test_metrics_gateway import gateway_text  # the suite's gateway, plus an admin key
from tests.rawhttp import Client


def get(port: int, ca, path: str, headers: dict | None = None):
    client = Client(port, ca)
    try:
        client.request("GET", path, headers or {})
        return client.response()
    finally:
        client.close()


def test_refusals_and_watches_reach_the_status_document(gateway_config, tmp_path, tls_files):
    folder, text = gateway_text(gateway_config, tmp_path)
    server = InProcessGateway(text, folder)
    ca = tls_files["ca"]
    try:
        page = server.gateway.status_page
        assert get(server.port, ca, "/kubernetes/cluster/one/api/v1/pods", {"Authorization": "Bearer nope"}).status == 401
        watch = Client(server.port, ca)
        watch.request("GET", "/kubernetes/cluster/one/api/v1/pods?watch=1&serve=watch", {"Authorization": f"Bearer {ACCESS_KEY}"})
        deadline = time.monotonic() + 5
        while True:
            document = server.call(page.document)
            watches = {row["name"]: row["watches"] for row in document["clusters"]}
            if watches.get("one") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert watches == {"one": 1, "down": 0}
        denial = document["denials"][0]
        assert (denial["code"], denial["user"], denial["path"], denial["cluster"]) == (401, "", "/kubernetes/cluster/one/api/v1/pods", "one")
        assert "nope" not in orjson.dumps(document).decode()
        watch.close()
    finally:
        server.stop()
