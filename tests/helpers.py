"""Helpers shared by the test modules: running the gateway as a real process."""
from __future__ import annotations

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


def start_gateway(config_text: str, folder: Path, timeout: float = 15) -> Process:
    """Run `fastproxy serve` on a config and wait for its 'listening on' line."""
    config = folder / "fastproxy.toml"
    config.write_text(textwrap.dedent(config_text))
    log = open(folder / "gateway.log", "w+")
    popen = subprocess.Popen([sys.executable, "-m", "fastproxy", "serve", "--config", str(config)],
                             stderr=log, stdout=log)
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
