"""Upgrade without refusing a connection: the new process accepts on the old one's socket.

On SIGUSR2 the gateway starts its own command line again (the new binary, once installed) and
hands it its listening socket as socket activation does (fd 3, LISTEN_FDS=1, LISTEN_PID). Both
accept on the same socket until the operator stops the old one (SIGTERM, a drain); connections
waiting in the backlog are taken by whichever accepts first, so none is refused. The new
process writes its own pid to [server] pid_file.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

log = logging.getLogger("fastproxy")

# fd 0 (the socket, as the child's stdin) becomes fd 3; LISTEN_PID is the shell's pid, which
# `exec` keeps for the gateway.
_PASS_SOCKET = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


def passing_socket(command: list[str]) -> list[str]:
    """`command` run so that the socket given as its stdin arrives as socket activation's."""
    return ["/bin/sh", "-c", _PASS_SOCKET, "fastproxy", *command]


def start_successor(sock: socket.socket) -> None:
    """Start `fastproxy` again with the same arguments, passing it `sock`."""
    command = [sys.executable, "-m", "fastproxy", *sys.argv[1:]]
    try:
        child = subprocess.Popen(passing_socket(command), stdin=sock.fileno())
    except OSError as exc:
        log.error("hand-over: cannot start %s: %s", " ".join(command), exc)
        return
    log.info("hand-over: started pid %d on this listening socket; stop this process (pid %d) once it listens",
             child.pid, os.getpid())
