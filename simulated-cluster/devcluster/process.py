"""Start and stop a devcluster process, for the demo command and end-to-end tests."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RulesArg = str | os.PathLike | Sequence[Mapping[str, Any]] | None


class DevClusterError(RuntimeError):
    pass


@dataclass
class DevCluster:
    """A running devcluster. `stop()` (or leaving the `with` block) ends it."""
    directory: Path
    process: subprocess.Popen
    url: str
    ca_file: Path
    gateway_token_file: Path
    admin_token_file: Path
    gateway_cert_file: Path
    gateway_key_file: Path
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    @property
    def gateway_token(self) -> str:
        return self.gateway_token_file.read_text().strip()

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> DevCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_devcluster(directory: str | os.PathLike, *, rules: RulesArg = None,
                     tokens: Mapping[str, tuple[str, Iterable[str]]] | None = None,
                     activity_rate: float = 0, seed: bool = True, listen: str = "127.0.0.1:0",
                     watch_history: int = 1000, services: Mapping[str, str | os.PathLike] | None = None,
                     timeout: float = 20, verbose: bool = False) -> DevCluster:
    """Start `python -m devcluster` and wait until it is ready.

    `rules` is a rules file path or the rules themselves (written to DIR/rules.json); `tokens`
    maps extra bearer tokens to (user, groups); `services` maps "NS/NAME" to another devcluster's
    directory, served through this one's service proxy. Output goes to DIR/devcluster.log, which the
    raised DevClusterError quotes if the process dies or is not ready within `timeout` seconds.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ready_file = directory / "ready.json"
    ready_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "devcluster", "--dir", str(directory), "--listen", listen,
               "--activity-rate", str(activity_rate), "--watch-history", str(watch_history),
               "--seed" if seed else "--no-seed", *(["--verbose"] if verbose else [])]
    if rules is not None:
        if not isinstance(rules, (str, os.PathLike)):
            rules_file = directory / "rules.json"
            rules_file.write_text(json.dumps(list(rules), indent=2))
            rules = rules_file
        command += ["--rules", str(rules)]
    for service, backend in (services or {}).items():
        command += ["--service", f"{service}={Path(backend).resolve()}"]
    if tokens:
        token_file = directory / "tokens.csv"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as out:
            writer = csv.writer(out)
            for token, (user, groups) in tokens.items():
                writer.writerow([token, user, user, ",".join(groups)])
        command += ["--token-auth-file", str(token_file)]
    log_file = directory / "devcluster.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    deadline = time.monotonic() + timeout
    while True:
        ready = _read_ready(ready_file)
        if ready is not None and ready.get("pid") == process.pid:
            break
        if process.poll() is not None:
            raise DevClusterError(
                f"devcluster exited with code {process.returncode}:\n{log_file.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise DevClusterError(f"devcluster not ready after {timeout}s:\n{log_file.read_text()}")
        time.sleep(0.05)
    return DevCluster(directory=directory, process=process, url=ready["url"],
                      ca_file=Path(ready["ca_file"]), gateway_token_file=Path(ready["gateway_token_file"]),
                      admin_token_file=Path(ready["admin_token_file"]),
                      gateway_cert_file=Path(ready["gateway_cert_file"]),
                      gateway_key_file=Path(ready["gateway_key_file"]), log_file=log_file)


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
