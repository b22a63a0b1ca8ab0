"""The devcluster as a process: credentials kept across restarts, clean shutdown, start-up errors,
and watch history expiry (each test starts its own small, unseeded devcluster)."""
from __future__ import annotations

import json
import signal
import stat
import time

import pytest

from devcluster import DevClusterError, start_devcluster

pytestmark = pytest.mark.e2e


def test_restart_reuses_credentials_and_stops_cleanly(tmp_path, api_for):
    with start_devcluster(tmp_path, seed=False) as first:
        ready = json.loads((tmp_path / "ready.json").read_text())
        assert ready == {"url": first.url, "ca_file": str(tmp_path / "ca.crt"),
                         "gateway_token_file": str(tmp_path / "gateway.token"),
                         "admin_token_file": str(tmp_path / "admin.token"),
                         "gateway_cert_file": str(tmp_path / "gateway.crt"),
                         "gateway_key_file": str(tmp_path / "gateway.key"), "pid": first.pid}
        status, namespaces = api_for(first).request("GET", "/api/v1/namespaces")
        assert (status, namespaces["items"]) == (200, [])
        ca, token = first.ca_file.read_bytes(), first.admin_token
    assert first.process.returncode == 0
    assert not (tmp_path / "ready.json").exists()
    for secret in ("ca.key", "server.key", "gateway.key", "admin.token", "gateway.token"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600, secret
    with start_devcluster(tmp_path, seed=False) as second:
        assert second.ca_file.read_bytes() == ca and second.admin_token == token
        assert api_for(second).request("GET", "/version")[0] == 200


def test_sigterm_ends_open_streams_and_exits_within_a_second(tmp_path, api_for):
    with start_devcluster(tmp_path) as cluster:
        api = api_for(cluster)
        watch = api.watch("/api/v1/namespaces/default/configmaps?watch=1")
        follow = api.watch("/api/v1/namespaces/default/pods/hello/log?follow=true&tailLines=1")
        try:
            assert watch.next_event()["type"] == "ADDED"
            assert follow.response.readline() == b"hello/hello: log line 10\n"
            started = time.monotonic()
            cluster.process.send_signal(signal.SIGTERM)
            assert cluster.process.wait(2) == 0
            assert time.monotonic() - started < 1.0
            assert watch.next_event() is None
            assert follow.response.read() in (b"", b"hello/hello: log line 11\n")
        finally:
            watch.close()
            follow.close()


def test_too_old_watch_version_is_expired(tmp_path, api_for):
    with start_devcluster(tmp_path, seed=False, watch_history=3) as cluster:
        api = api_for(cluster)
        for name in ("one", "two", "three", "four", "five"):
            assert api.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})[0] == 201
        stream = api.watch("/api/v1/namespaces?watch=1&resourceVersion=1")
        try:
            assert stream.response.status == 200
            assert stream.next_event() == {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version: 1 (3)", "reason": "Expired", "code": 410}}
            assert stream.next_event() is None
        finally:
            stream.close()
        stream = api.watch("/api/v1/namespaces?watch=1&resourceVersion=2")
        try:
            assert [stream.next_event()["object"]["metadata"]["name"] for _ in range(3)] == \
                ["three", "four", "five"]
        finally:
            stream.close()


def test_activity_makes_watch_events(tmp_path, api_for):
    with start_devcluster(tmp_path, activity_rate=20) as cluster:
        stream = api_for(cluster).watch("/api/v1/namespaces/team-a/configmaps?watch=1"
                                        "&labelSelector=fastproxy.dev%2Factivity%3Dtrue", timeout=3)
        try:
            seen = {stream.next_event()["type"] for _ in range(6)}
            assert "ADDED" in seen and seen <= {"ADDED", "MODIFIED", "DELETED"}
        finally:
            stream.close()


def test_bad_rules_file_fails_start_with_the_reason(tmp_path):
    with pytest.raises(DevClusterError, match="a rule needs verbs"):
        start_devcluster(tmp_path, rules=[{"users": ["bob"], "resources": ["pods"]}])
