"""Which configuration changes a running gateway can take on SIGHUP, and which need a restart."""
from __future__ import annotations

import argparse
import os
import signal

from .config import Config, ConfigError, load_config

# Tables whose objects live as long as the process (the state store's reader, the token keys,
# the metrics share, the audit and access log writers, the virtual clusters' and Grafana's
# registries): a change to them needs a restart.
_RESTART_TABLES = ("state", "tokens", "metrics", "activity", "audit", "access_log", "virtual_clusters", "grafana",
                   "login", "ui", "oidc", "limits")


def reload_refusal(old: Config, new: Config) -> str | None:
    """Why `new` cannot replace `old` in the running process (one line naming the key), or None."""
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        return (f"server.listen: changed from {_address(old)} to {_address(new)}; "
                "a new listening address needs a restart")
    if old.server.tls != new.server.tls:
        return "server.tls_cert_file: switching between HTTPS and plain HTTP needs a restart"
    if old.server.workers != new.server.workers:
        return f"server.workers: changed from {old.server.workers} to {new.server.workers}; that needs a restart"
    for table in _RESTART_TABLES:
        if getattr(old, table) != getattr(new, table):
            return f"{table}: changed; the {table} table is read at start only, that needs a restart"
    return None


def _address(config: Config) -> str:
    host = config.server.host
    return f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"


def write_pid_file(config: Config) -> None:
    """Where `fastproxy reload` finds this process: [server] pid_file, when set."""
    path = config.server.pid_file
    if path is not None:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")


def remove_pid_file(config: Config) -> None:
    path = config.server.pid_file
    if path is not None:
        try:
            with open(path, encoding="ascii") as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:  # a newer process (a hand-over) may have written its own meanwhile
                os.unlink(path)
        except OSError:
            pass


def running_pid(config: Config) -> int:
    """The pid of the gateway serving `config`, from its pid file; ConfigError when there is none."""
    path = config.server.pid_file
    if path is None:
        raise ConfigError("server.pid_file: not set, so the running gateway cannot be found "
                          "(under systemd: systemctl reload fastproxy)")
    try:
        with open(path, encoding="ascii") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        # `fastproxy serve ...` or `python -m fastproxy serve ...`, not a pid reused by another program
        running = b"serve" in args and any(os.path.basename(arg) == b"fastproxy" for arg in args)
    except (OSError, ValueError):
        running = False
    if not running:
        raise ConfigError(f"server.pid_file: {path} names no running fastproxy")
    return pid


def _reload(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    pid = running_pid(config)
    os.kill(pid, signal.SIGHUP)
    print(f"{args.config}: ok; asked the gateway (pid {pid}) to reload it")
    return 0


def add_reload_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    reload = commands.add_parser("reload", help="check a configuration file, then make the running gateway reload it")
    reload.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    reload.set_defaults(handler=_reload)
