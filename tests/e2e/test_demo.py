"""`fastproxy demo` as a user runs it (what scripts/run starts): the commands it prints work."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.e2e.test_kubectl_through_gateway import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    listen = f"127.0.0.1:{free_port()}"
    log = open(folder / "demo.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "fastproxy", "demo", "--dir", str(folder / "state"), "--listen", listen],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C stops everything" not in (text := (folder / "demo.log").read_text()):
            assert process.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
        time.sleep(0.5)  # the printed hints come before the listener is up
        yield text, {**os.environ, "KUBECONFIG": str(folder / "state" / "kubeconfig"), "HOME": str(folder)}
    finally:
        process.terminate()
        process.wait(20)


def printed(text: str, starting: str) -> str:
    """The command the demo printed that starts with `starting`, without its comment."""
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith(starting))
    return re.sub(r"\s+#.*$", "", line)


def run(command: str, env: dict) -> str:
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def test_the_management_api_hints_work(demo):
    text, env = demo
    resources = run(printed(text, "kubectl --context management api-resources"), env)
    assert "users" in resources and "namespaceactivities" in resources
    listed = run(printed(text, "kubectl --context management get users,teams,clusters"), env)
    assert "jane" in listed and "developers" in listed and "demo" in listed
    run(printed(text, "fastproxy user create"), env | {"PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}"})
    deadline = time.monotonic() + 3  # the CLI writes the store; the gateway sees it within a poll
    while "user.management.loft.sh/bob" not in run("kubectl --context management get users -o name", env):
        assert time.monotonic() < deadline, "the user the CLI created never appeared"
        time.sleep(0.2)
    assert "email" in run(printed(text, "kubectl --context management explain user.spec"), env)


def test_the_metrics_hint_shows_the_requests_made(demo):
    text, env = demo
    run("kubectl get pods -A", env)
    metrics = run(printed(text, "curl -s --cacert"), env)
    assert re.search(r'^fastproxy_requests_total\{endpoint="cluster",cluster="demo",verb="list",code="200"\} [1-9]', metrics, re.M)


def test_the_status_page_hint_serves_its_sign_in_form(demo):
    text, env = demo
    url = next(line.strip() for line in text.splitlines() if line.strip().endswith("/ui/"))
    ca = re.search(r"--cacert (\S+)", text).group(1)
    page = run(f"curl -s --cacert {ca} {url}", env)
    assert 'action="/ui/signin"' in page and 'name="username"' in page and 'name="key" type="password"' in page
    cli_env = env | {"PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}"}
    lines = [line.strip() for line in text.splitlines()]
    run(next(line for line in lines if "user create" in line and "loft:admins" in line), cli_env)
    run("echo ops-Demo-Horse-9 | " + next(line for line in lines if "set-password" in line and line.endswith(" ops")), cli_env)
    deadline = time.monotonic() + 5  # the CLI writes the store; the gateway sees it within a poll
    while "user.management.loft.sh/ops" not in run("kubectl --context management get users -o name", env):
        assert time.monotonic() < deadline, "the user the CLI created never appeared"
        time.sleep(0.2)
    time.sleep(0.5)  # its password came in the write after it
    origin = url.removesuffix("/ui/")
    answer = run(f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {ca} -H 'Origin: {origin}' "
                 f"--data-urlencode username=ops --data-urlencode password=ops-Demo-Horse-9 {origin}/ui/signin", env)
    assert answer == "303"  # signed in: the page's answer to a right password is the redirect with the cookie


def test_the_log_hints_show_a_request_by_its_id(demo):
    """A request's X-Request-Id is the id of its access-log line and the auditID of its events."""
    text, env = demo
    answer = run("kubectl get pods -n team-a -v=8 2>&1", env)
    request_id = re.search(r"X-Request-Id: ([0-9a-f-]{36})", answer, re.I).group(1)
    access_log = re.search(r"tail -f (\S+access\.log)", text).group(1)
    audit_log = re.search(r"tail -f (\S+audit\.log)", text).group(1)
    deadline = time.monotonic() + 10
    while True:  # both logs are written off the event loop: the lines come within moments
        mine = [line for line in map(json.loads, open(access_log).read().splitlines()) if line["id"] == request_id]
        stages = {event["stage"] for event in map(json.loads, open(audit_log).read().splitlines())
                  if event["auditID"] == request_id}
        if (mine and "ResponseComplete" in stages) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(line["user"], line["verb"], line["resource"], line["namespace"]) for line in mine] == \
        [("admin", "list", "pods", "team-a")]
    assert stages == {"RequestReceived", "ResponseComplete"}
    ready = run(next(line.strip() for line in text.splitlines() if "readyz?verbose" in line), env)
    assert "readyz check passed" in ready
