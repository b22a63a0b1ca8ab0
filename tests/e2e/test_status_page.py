"""The status page /ui/ in headless Chromium (driven by selenium), against the real `fastproxy
serve` with two workers in front of two simulated clusters, one of which the tests stop."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from devcluster.process import start_devcluster
from fastproxy.demo import CLUSTER, VIEWER_RULES, prepare
from tests.e2e.test_kubectl_through_gateway import free_port
from tests.e2e.test_login import cli
from tests.helpers import start_gateway

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SPARE = "spare"  # the second cluster, which a test stops
WRONG_KEY = "fpk-wrong-" + "x" * 30
ADMIN_USER, ADMIN_PASSWORD = "root", "root-Browser-Horse-8"  # a state-store administrator with a password


class Stack:
    def __init__(self, folder: Path, url: str, ca: str, admin_key: str, viewer_key: str, spare, log: Path):
        self.folder, self.url, self.ca = folder, url, ca
        self.admin_key, self.viewer_key, self.spare, self.log = admin_key, viewer_key, spare, log

    def curl(self, path: str, *args: str) -> tuple[int, dict[str, str], bytes]:
        """(code, headers with lower-case names, body) of one request on a connection of its own."""
        result = subprocess.run(["curl", "-s", "-D", "-", "--cacert", self.ca, *args, self.url + path],
                                capture_output=True, timeout=30)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, body

    def sign_in(self, key: str) -> str:
        """The session cookie (NAME=VALUE) the sign-in form answers for `key`."""
        code, headers, _ = self.curl("/ui/signin", "-H", f"Origin: {self.url}", "--data-urlencode", f"key={key}")
        assert code == 303, code
        return headers["set-cookie"].split(";")[0]

    def status(self, cookie: str) -> dict:
        code, headers, body = self.curl("/ui/api/status", "-H", f"Cookie: {cookie}")
        assert code == 200, body
        assert headers["cache-control"] == "no-store"
        return orjson.loads(body)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    cluster = start_devcluster(folder / "cluster", rules=VIEWER_RULES)
    spare = start_devcluster(folder / "spare")
    gateway = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        config = prepare(folder, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)
        text = config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1) + (
            f'\n[[clusters]]\nname = "{SPARE}"\nserver = "{spare.url}"\nca_file = "{spare.ca_file}"\n'
            f'token_file = "{spare.gateway_token_file}"\n')
        cli(config, "user", "create", ADMIN_USER, "--group", "loft:admins")
        cli(config, "user", "set-password", ADMIN_USER, stdin=ADMIN_PASSWORD + "\n")
        gateway = start_gateway(text, folder)
        yield Stack(folder, f"https://{listen}", str(folder / "gateway-tls" / "ca.crt"),
                    (folder / "admin.key").read_text().strip(), (folder / "viewer.key").read_text().strip(), spare,
                    folder / "gateway.log")
    finally:
        if gateway is not None:
            gateway.stop()
        spare.stop()
        cluster.stop()


@pytest.fixture(scope="module")
def browser(stack, tmp_path_factory):
    """Headless Chromium that trusts the gateway's test CA (in an NSS database of its own HOME)."""
    home = tmp_path_factory.mktemp("browser-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "fastproxy-test-ca", "-i", stack.ca],
                   check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={home / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)}))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(home, ignore_errors=True)


def sign_in_with(browser, stack, key: str) -> None:
    browser.delete_all_cookies()
    browser.get(stack.url + "/ui/")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "signin").click()
    # The answer is a new page: the dashboard, or the form again with its error.
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "error") or b.find_elements(By.ID, "clusters"))


def sign_in_with_password(browser, stack, password: str) -> None:
    browser.delete_all_cookies()
    browser.get(stack.url + "/ui/")
    browser.find_element(By.ID, "username").send_keys(ADMIN_USER)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "signin-password").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "error") or b.find_elements(By.ID, "clusters"))


def cell(browser, table: str, row_name: str, column: int) -> str:
    """The text of a table cell, read in one step (the page's script replaces the rows as it polls)."""
    return browser.execute_script("""
        for (const row of document.querySelectorAll("#" + arguments[0] + " tbody tr")) {
            if (row.cells.length > arguments[2] && row.cells[0].textContent === arguments[1]) {
                return row.cells[arguments[2]].textContent;
            }
        }
        return "";""", table, row_name, column)


def test_without_a_session_the_page_is_the_sign_in_form(browser, stack):
    browser.delete_all_cookies()
    browser.get(stack.url + "/ui/")
    assert browser.find_element(By.ID, "key").get_attribute("type") == "password"
    assert not browser.find_elements(By.ID, "clusters")
    code, _, body = stack.curl("/ui/api/status")
    assert code == 401 and b'"reason":"Unauthorized"' in body


def test_a_wrong_key_is_an_error_and_leaks_nothing(browser, stack):
    sign_in_with(browser, stack, WRONG_KEY)
    assert "not accepted" in browser.find_element(By.ID, "error").text
    assert WRONG_KEY not in browser.page_source
    assert "/signin" in browser.current_url and "key" not in browser.current_url.partition("?")[2]
    assert not browser.get_cookies()
    assert not browser.find_elements(By.ID, "clusters")


def test_a_non_admin_key_is_refused(browser, stack):
    sign_in_with(browser, stack, stack.viewer_key)
    assert "not an administrator" in browser.find_element(By.ID, "error").text
    assert not browser.get_cookies() and not browser.find_elements(By.ID, "clusters")
    code, _, _ = stack.curl("/ui/signin", "-H", f"Origin: {stack.url}", "--data-urlencode", f"key={stack.viewer_key}")
    assert code == 403


def test_the_page_renders_the_clusters(browser, stack):
    sign_in_with(browser, stack, stack.admin_key)
    WebDriverWait(browser, 10).until(lambda b: cell(b, "clusters", CLUSTER, 1) == "Ready")
    assert cell(browser, "clusters", CLUSTER, 2).startswith("v1.")
    assert cell(browser, "clusters", CLUSTER, 3).endswith(" ms")
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#chart-requests polyline"))
    points = browser.find_element(By.CSS_SELECTOR, "#chart-requests polyline").get_attribute("points")
    assert len(points.split()) == 30  # drawn by the page's own script: five minutes in 10 s points
    cookie = next(c for c in browser.get_cookies() if c["name"] == "fastproxy_ui")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    violations = [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert not violations


def test_a_cluster_going_down_shows_without_reloading(browser, stack):
    sign_in_with(browser, stack, stack.admin_key)
    WebDriverWait(browser, 10).until(lambda b: cell(b, "clusters", SPARE, 1) == "Ready")
    browser.execute_script("window.samePage = true;")
    stack.spare.stop()
    stopped = time.monotonic()
    WebDriverWait(browser, 15, poll_frequency=0.2).until(lambda b: cell(b, "clusters", SPARE, 1) == "Unreachable")
    assert time.monotonic() - stopped < 10
    assert browser.execute_script("return window.samePage === true;")  # redrawn by the poll, not reloaded
    assert cell(browser, "clusters", CLUSTER, 1) == "Ready"


def test_the_page_shows_the_whole_service(stack):
    cookie = stack.sign_in(stack.admin_key)
    assert stack.status(cookie)["workers"] == 2
    for _ in range(8):  # each on a connection of its own: the two workers share them
        code, _, _ = stack.curl(f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces", "-H", f"Authorization: Bearer {WRONG_KEY}")
        assert code == 401
    for _ in range(12):
        code, _, _ = stack.curl(f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/team-a/pods",
                                "-H", f"Authorization: Bearer {stack.admin_key}")
        assert code == 200
    deadline = time.monotonic() + 15
    while True:
        document = stack.status(cookie)
        denied = [d for d in document["denials"] if d["path"] == f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces"]
        requests = sum(document["rates"]["requests"]) * document["rates"]["bucketSeconds"]
        active = [n for n in document["namespaces"] if (n["cluster"], n["namespace"]) == (CLUSTER, "team-a")]
        if (len(denied) == 8 and requests >= 20 and active) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(denied) == 8 and all(d["code"] == 401 and d["user"] == "" for d in denied)
    assert requests >= 20
    assert active and active[0]["subject"] == "admin"
    assert WRONG_KEY.encode() not in orjson.dumps(document)


def test_a_denial_appears_on_the_open_page(browser, stack):
    sign_in_with(browser, stack, stack.admin_key)
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "denials"))
    browser.execute_script("window.samePage = true;")
    path = f"/kubernetes/cluster/{CLUSTER}/api/v1/namespaces/denied-{time.monotonic_ns()}/pods"
    code, _, _ = stack.curl(path, "-H", f"Authorization: Bearer {WRONG_KEY}")
    assert code == 401
    WebDriverWait(browser, 10, poll_frequency=0.2).until(
        lambda b: path in b.find_element(By.ID, "denials").text)
    assert browser.execute_script("return window.samePage === true;")
    assert WRONG_KEY not in browser.page_source


def test_the_page_forbids_framing_inline_script_and_caching(stack):
    code, headers, body = stack.curl("/ui/")
    assert code == 200
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert b"<script>" not in body and b'<script src="/ui/app.js">' not in body  # the form needs no script
    code, headers, body = stack.curl("/ui/app.js")
    assert code == 200 and headers["content-type"].startswith("text/javascript")


def test_an_administrator_signs_in_with_a_password_and_out_again(browser, stack):
    sign_in_with_password(browser, stack, "not-the-password")
    assert "not accepted" in browser.find_element(By.ID, "error").text
    assert not browser.find_elements(By.ID, "clusters") and ADMIN_PASSWORD not in browser.current_url
    for _ in range(3):  # either worker may answer the redirect, before or after its snapshot has the new key
        sign_in_with_password(browser, stack, ADMIN_PASSWORD)
        assert not browser.find_elements(By.ID, "error")
        assert ADMIN_USER in browser.find_element(By.TAG_NAME, "header").text
        WebDriverWait(browser, 10).until(lambda b: cell(b, "clusters", CLUSTER, 1) == "Ready")
        browser.find_element(By.CSS_SELECTOR, "header button").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "username"))
    keys = [line.split() for line in cli(stack.folder / "fastproxy.toml", "accesskey", "list").splitlines()]
    assert not [row for row in keys if row[1:3] == ["Login", f"user/{ADMIN_USER}"]]  # each sign-out revoked its key


def test_a_sign_in_posted_from_elsewhere_is_refused(stack):
    for origin in ("https://attacker.example", None):
        args = ["--data-urlencode", f"key={stack.admin_key}"] + (["-H", f"Origin: {origin}"] if origin else [])
        code, headers, _ = stack.curl("/ui/signin", *args)
        assert code == 403 and "set-cookie" not in headers


def test_signing_out_ends_the_session(browser, stack):
    sign_in_with(browser, stack, stack.admin_key)
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "clusters"))
    browser.find_element(By.CSS_SELECTOR, "header button").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "key"))
    assert not [c for c in browser.get_cookies() if c["name"] == "fastproxy_ui"]


def test_no_key_reaches_the_log(stack):
    text = stack.log.read_text()
    assert stack.admin_key not in text and stack.viewer_key not in text and WRONG_KEY not in text
