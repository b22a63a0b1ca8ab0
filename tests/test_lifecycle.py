"""The pure parts of running as a service: notify lines, the supervisor's view of its workers,
health reports, the drain's schedule and which reloads a running gateway takes."""
from __future__ import annotations

import dataclasses
import os

import pytest

from fastproxy.config import ConfigError, parse_config
from fastproxy.drain import watch_end_offsets
from fastproxy.lifecycle import Fleet, Phase
from fastproxy.local import health_report
from fastproxy.reload import reload_refusal, running_pid, write_pid_file
from fastproxy.sdnotify import message, socket_address, status_text, watchdog_interval


def test_notify_lines_and_addresses():
    assert message(READY=1, STATUS="2 workers") == b"READY=1\nSTATUS=2 workers\n"
    assert socket_address("@fastproxy/notify") == b"\0fastproxy/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert status_text(1, 3, 0) == "1 worker, 3 connections, 0 watches"


def test_the_watchdog_is_for_the_pid_it_names():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "nonsense"}, 7) is None
    assert watchdog_interval({}, 7) is None


def test_the_fleet_is_ready_when_every_worker_listens():
    fleet = Fleet()
    fleet.started(10, now=0.0)
    fleet.started(11, now=0.0)
    fleet.record("10 listening", now=0.1)
    assert not fleet.settle() and fleet.phase is Phase.STARTING
    fleet.record("11 listening", now=0.2)
    assert fleet.settle() and fleet.phase is Phase.SERVING
    assert not fleet.settle()  # said once


def test_a_reload_is_done_when_every_worker_reloaded():
    fleet = Fleet()
    for pid in (10, 11):
        fleet.started(pid, 0.0)
        fleet.record(f"{pid} listening", 0.0)
    fleet.settle()
    fleet.begin_reload()
    fleet.record("10 reloaded", 1.0)
    assert not fleet.settle() and fleet.phase is Phase.RELOADING
    fleet.exited(11)  # a worker that died is not waited for
    fleet.started(12, 1.0)  # nor one that started since
    assert fleet.settle() and fleet.phase is Phase.SERVING
    fleet.begin_reload()
    assert not fleet.settle()  # 10 again, but not 12: it does not listen yet
    fleet.record("10 reloaded", 2.0)
    assert fleet.settle()


def test_liveness_needs_every_worker_and_status_adds_them_up():
    fleet = Fleet()
    fleet.started(10, 0.0)
    fleet.started(11, 0.0)
    fleet.record("10 alive 5 2", 3.0)
    fleet.record("11 alive 1 0", 1.0)
    fleet.record("12 alive 9 9", 3.0)  # not a worker (any more): ignored
    fleet.record("garbage", 3.0)
    assert fleet.all_live(3.0, stale_after=2.0)
    assert not fleet.all_live(3.5, stale_after=2.0)  # 11 has been silent 2.5 s
    assert fleet.status() == "2 workers, 6 connections, 2 watches"
    assert not Fleet().all_live(0.0, 1.0)  # no worker: nothing is alive


def test_health_reports_as_the_api_server_words_them():
    assert health_report("readyz", [("ping", None), ("shutdown", None)], verbose=False) == (200, b"ok")
    assert health_report("readyz", [("ping", None)], verbose=True) == (200, b"[+]ping ok\nreadyz check passed\n")
    code, body = health_report("readyz", [("ping", None), ("shutdown", "draining")], verbose=False)
    assert (code, body) == (503, b"[+]ping ok\n[-]shutdown failed: draining\nreadyz check failed\n")
    code, _ = health_report("readyz", [("keys", "the state store cannot be read"), ("shutdown", "draining")], verbose=False)
    assert code == 500


def test_watches_end_spread_over_the_period():
    assert watch_end_offsets(4, 10.0) == [2.5, 5.0, 7.5, 10.0]
    assert watch_end_offsets(3, 0.0) == [0.0, 0.0, 0.0]
    assert watch_end_offsets(0, 10.0) == []


def test_what_a_reload_cannot_change():
    old = parse_config({"server": {"listen": "127.0.0.1:8443"}})
    assert reload_refusal(old, parse_config({"server": {"listen": "127.0.0.1:8443", "idle_timeout": 5}})) is None
    moved = parse_config({"server": {"listen": "127.0.0.1:9443"}})
    assert reload_refusal(old, moved) == ("server.listen: changed from 127.0.0.1:8443 to 127.0.0.1:9443; "
                                          "a new listening address needs a restart")
    assert reload_refusal(old, dataclasses.replace(old, server=dataclasses.replace(old.server, workers=4))) \
        .startswith("server.workers: changed from 1 to 4")
    assert reload_refusal(old, parse_config({"server": {"listen": "127.0.0.1:8443"}, "metrics": {"enabled": False}})) \
        .startswith("metrics: changed")
    assert reload_refusal(old, parse_config({"server": {"listen": "127.0.0.1:8443"}, "access_log": {"sample": 1}})) \
        .startswith("access_log: changed; the access_log table is read at start only")


def test_reload_finds_the_gateway_by_its_pid_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^server.pid_file: not set, so the running gateway cannot be found"):
        running_pid(parse_config({}))
    pid_file = tmp_path / "fastproxy.pid"
    config = parse_config({"server": {"pid_file": str(pid_file)}})
    write_pid_file(config)
    assert pid_file.read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError, match=r"names no running fastproxy$"):
        running_pid(config)  # a live process, but not a gateway: never signalled
    pid_file.write_text("999999999\n")
    with pytest.raises(ConfigError, match=r"names no running fastproxy$"):
        running_pid(config)
    with pytest.raises(ConfigError, match=r"^server.pid_file: folder not found: "):
        parse_config({"server": {"pid_file": str(tmp_path / "missing" / "fastproxy.pid")}})
