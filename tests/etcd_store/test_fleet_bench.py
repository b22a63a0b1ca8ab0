"""The fleet benchmark's harness, small (2 gateways, 200 keys, 5 revocations): so it cannot rot between
the full runs whose figures bench/results/ records. The gateways are real `fastproxy serve` processes
on a real etcd and devcluster; every revocation must be reported gone by both, and a key reported
gone must be refused."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_fleet_bench_sees_every_revocation_on_every_gateway():
    run = subprocess.run([sys.executable, "-m", "bench.etcd_fleet", "--gateways", "2", "--keys", "200",
                          "--revocations", "5", "--interval", "0.05", "--rate", "20", "--warmup", "1"],
                         cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 gateways, 200 keys, 5 revocations every 50 ms (10 propagations, 0 not seen)" in run.stdout, run.stdout
    p50, p99, top = map(float, re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms", run.stdout).groups())
    assert 0 < p50 <= p99 <= top, run.stdout
    assert re.search(r"revoker: committed p50 [\d.]+ ms", run.stdout), run.stdout
    assert re.search(r"etcd: [\d.]+ % of a core over [\d.]+ s; [\d.]+ writes/s", run.stdout), run.stdout
    requests, answers = re.search(r"traffic: (\d+) requests \(20/s per gateway\), answers (\{.*\});", run.stdout).groups()
    assert int(requests) > 0 and "'200'" in answers, run.stdout  # the gateways served the keys before revoking them
    assert re.search(r"\d+ sent with a key after its gateway reported it gone, 0 of them not refused", run.stdout), run.stdout
    assert "after the run, every revoked key on every gateway: answers {401: 10}" in run.stdout, run.stdout
