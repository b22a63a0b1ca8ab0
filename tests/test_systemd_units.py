"""The units in systemd/, as scripts/install-systemd installs them, pass `systemd-analyze verify`
and keep their `systemd-analyze security` exposure low."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    # The prefix is this test run's own installation, so ExecStart names a program that exists.
    subprocess.run([str(REPO / "scripts" / "install-systemd"), "--root", str(root), "--prefix", sys.prefix],
                   check=True, capture_output=True, text=True, timeout=60)
    return root


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed: it comes with Debian's systemd package (scripts/test installs it)")
    return path


def test_units_verify(installed):
    units = installed / "etc" / "systemd" / "system"
    service = (units / "fastproxy.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/fastproxy serve --config /etc/fastproxy/fastproxy.toml" in service
    result = subprocess.run([analyze(), "verify", str(units / "fastproxy.service"), str(units / "fastproxy.socket")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fastproxy" not in result.stderr, result.stderr  # no warning about either unit
    assert (installed / "etc" / "fastproxy" / "fastproxy.toml").stat().st_mode & 0o777 == 0o640


def test_service_exposure_stays_low(installed):
    result = subprocess.run([analyze(), "security", "--offline=yes",
                             str(installed / "etc" / "systemd" / "system" / "fastproxy.service")],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for fastproxy.service: ([\d.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout
