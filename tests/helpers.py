"""Helpers shared by the test modules: running the gateway as a real process."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ACCESS_KEY = "test-access-key-0123456789"


class Process:
    def __init__(self, popen: subprocess.Popen, port: int):
        self.popen, self.port = popen, port

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_server(argv: list[str]) -> Process:
    """Run a test server process that prints the port it listens on as its first line."""
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    return Process(popen, int(popen.stdout.readline()))


def start_gateway(config_text: str, folder: Path, timeout: float = 15, env: dict | None = None,
                  wrapper: tuple[str, ...] = (), **popen_args) -> Process:
    """Run `fastproxy serve` on a config and wait for its 'listening on' line (`env`: extra
    environment variables; `wrapper`: a command line that execs the gateway's, given last)."""
    config = folder / "fastproxy.toml"
    config.write_text(textwrap.dedent(config_text))
    log = open(folder / "gateway.log", "w+")
    popen = subprocess.Popen([*wrapper, sys.executable, "-m", "fastproxy", "serve", "--config", str(config)],
                             stderr=log, stdout=log, env={**os.environ, **(env or {})}, **popen_args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (folder / "gateway.log").read_text()
        found = re.search(r"listening on \w+://[^ ]+:(\d+)", text)
        if found:
            process = Process(popen, int(found.group(1)))
            process.log = folder / "gateway.log"
            _wait_accepting(process.port, deadline)  # with workers = N the supervisor says so before they listen
            return process
        if popen.poll() is not None:
            raise RuntimeError(f"gateway exited: {text}")
        time.sleep(0.05)
    popen.kill()
    raise RuntimeError(f"gateway did not start: {(folder / 'gateway.log').read_text()}")


def _wait_accepting(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
