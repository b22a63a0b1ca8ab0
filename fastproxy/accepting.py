"""Accepting client connections on a listening socket, with rests instead of failures.

An Acceptor takes connections in batches on the socket's readiness. When the process is out of
file descriptors (EMFILE and the like), or when `room()` says the worker holds as many
connections as `[limits] connections_per_worker` allows, it stops watching the socket for a
while: new clients wait in the kernel's backlog (or go to another worker) instead of being
accepted only to be dropped.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

ACCEPT_BATCH = 128   # connections accepted per readiness callback
ACCEPT_PAUSE = 1.0   # how long accepting rests when the process is out of file descriptors
FULL_PAUSE = 0.05    # how long accepting rests before looking again whether a connection left
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

log = logging.getLogger("fastproxy")


class Acceptor:
    """The accept loop; a subclass says what becomes of each accepted socket (`accepted`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket):
        self._loop = loop
        self._listener = listener
        self._resume: asyncio.TimerHandle | None = None
        self.room: Callable[[], bool] | None = None  # None: no cap on connections
        self.handshakes = 0  # accepted and not yet connections: a drain lets them finish, the cap counts them
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def accepted(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        room = self.room
        for _ in range(ACCEPT_BATCH):
            if room is not None and not room():
                self._rest(FULL_PAUSE)
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept clients for %gs: %s", ACCEPT_PAUSE, exc)
                    self._rest(ACCEPT_PAUSE)
                    return
                continue  # that client gave up (ECONNABORTED and the like)
            self.accepted(sock)

    def _rest(self, seconds: float) -> None:
        self._loop.remove_reader(self._listener.fileno())
        self._resume = self._loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        self._loop.add_reader(self._listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if self._listener.fileno() < 0:
            return
        if self._resume is not None:
            self._resume.cancel()
        else:
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()


class PlainListener(Acceptor):
    """Plain HTTP clients, when a connection cap needs the accept loop in hand (else the loop's
    own server accepts them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol]):
        super().__init__(loop, listener)
        self._protocol_factory = protocol_factory

    def accepted(self, sock: socket.socket) -> None:
        self.handshakes += 1
        starting = self._loop.create_task(self._loop.connect_accepted_socket(self._protocol_factory, sock))
        starting.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]) -> None:
        self.handshakes -= 1
        if not task.cancelled() and task.exception() is not None:
            log.debug("client connection could not start: %s", task.exception())
