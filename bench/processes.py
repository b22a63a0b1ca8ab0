"""Starting, probing and stopping the pinned processes of a bench run."""
from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

PROXY_CPU = 0  # the proxy under test has this core to itself
LOAD_CPU = 1  # upstream, load generators and the harness share this one


class Unavailable(Exception):
    """A target could not be started; the message says why, for the person running the bench."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A command pinned to one CPU, logging to a file, in its own process group."""

    def __init__(self, name: str, argv: list[str], cpu: int, log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],  # taskset execs the command: same pid
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 12) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # workers a master left behind
        self.popen.wait()


def http_get(url: str, headers: dict[str, str], cafile: Path | None, timeout: float = 5) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context(cafile=cafile)
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_ready(
    process: Process,
    url: str,
    headers: dict[str, str] | None = None,
    cafile: Path | None = None,
    timeout: float = 20,
    expect_status: int = 200,
) -> None:
    """Poll url until it answers expect_status; fail early, with the process's last log lines, if it exits."""
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise Unavailable(
                f"{process.name} exited with code {process.popen.returncode} before answering {url}\n"
                f"--- last lines of {process.log_path} ---\n{process.log_tail()}"
            )
        try:
            status, body = http_get(url, headers or {}, cafile)
            if status == expect_status:
                return
            last_problem = f"HTTP {status}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as error:
            last_problem = f"{type(error).__name__}: {error}"
        time.sleep(0.05)
    raise Unavailable(
        f"{process.name} did not answer {url} with {expect_status} within {timeout:.0f}s (last: {last_problem})\n"
        f"--- last lines of {process.log_path} ---\n{process.log_tail()}"
    )
