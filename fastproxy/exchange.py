"""The handler interface: what a client connection drives for each request.

A Responder is one request and its response. The connection calls `start()` when the request's
turn comes (responses go out in request order), hands it the body as it is parsed
(`request_body`, `request_complete`, `tunnel_data` after an upgrade), tells it when the client
cannot take more (`writing_paused` / `writing_resumed`) and when the client is gone (`abandon`).
The responder writes through `client.transport` and ends with `finish()`. Observers see the
request's context once when the router has built the responder and once more when it finishes
or the client leaves.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from .context import Observers, RequestContext
from .flow import ReadGate
from .status import StatusError, status_response

# What the connection's deadline guards.
AWAITING_HEAD, IDLE, AWAITING_RESPONSE = 1, 2, 3


class Connection(Protocol):
    """The part of the client connection a responder uses."""

    transport: asyncio.Transport
    gate: ReadGate
    write_paused: bool
    active: Responder | None

    def set_deadline(self, kind: int, seconds: float) -> None: ...

    def clear_deadline(self, kind: int) -> None: ...

    def exchange_finished(self, exchange: Responder) -> None: ...


class Responder:
    """Base of every handler's per-request object; alone it answers with a fixed response."""

    __slots__ = ("client", "ctx", "observers", "keep_alive", "finished", "request_done", "tunnel", "upgrade",
                 "canned")

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool):
        self.client = client
        self.ctx = ctx
        self.observers = observers
        self.keep_alive = keep_alive
        self.finished = False
        self.request_done = False
        self.tunnel = False    # bytes flow both ways untouched (after a 101)
        self.upgrade = False   # the request asks to switch protocols: later bytes are tunnel data
        self.canned = b""      # a complete response to give in place of the handler's

    # --- driven by the client connection -----------------------------------------------------

    def start(self) -> None:
        """The request's turn has come: answer it."""
        if self.canned:
            self.respond(self.canned)
        else:
            self.serve()

    def serve(self) -> None:
        """What the handler does with the request (the base has only `canned` to give)."""
        raise NotImplementedError

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (dropped unless a handler reads it)."""
        self.ctx.bytes_in += len(data)

    def request_complete(self) -> None:
        self.request_done = True

    def tunnel_data(self, data: bytes) -> None:
        """Client bytes after an upgrade request."""

    def writing_paused(self) -> None:
        """The client's transport is above its high-water mark."""

    def writing_resumed(self) -> None:
        """The client's transport is below its low-water mark again."""

    def timed_out(self) -> None:
        """The AWAITING_RESPONSE deadline passed."""
        self.fail(504, "the response did not start in time")

    def abandon(self) -> None:
        """The client went away: release whatever the request holds, right now."""
        if not self.finished:
            self.finished = True
            self._observed_end()

    # --- endings -----------------------------------------------------------------------------

    def respond(self, response: bytes, status: int = 0) -> None:
        """Write a complete response and finish; `status` defaults to the one in its status line."""
        ctx = self.ctx
        ctx.status = status or int(response[9:12])
        ctx.bytes_out += len(response)
        self.client.transport.write(response)
        self.finish()

    def fail(self, code: int, message: str, *, close: bool = False, reason: str | None = None,
             details: dict[str, Any] | None = None) -> None:
        """Answer with a Status in place of the handler's response (queued: answered in its turn)."""
        self.keep_alive = self.keep_alive and not close
        self.ctx.message = message
        response = status_response(code, message, close=not self.keep_alive, reason=reason, details=details,
                                   extra=self.ctx.id_line)
        if self is not self.client.active:
            self.canned = response  # still queued: answered in its turn
            return
        self.respond(response)

    def refuse(self, error: StatusError, *, close: bool = False) -> None:
        """`fail` with what a StatusError says: code, message, reason and details."""
        self.fail(error.code, error.message, close=close or error.close, reason=error.reason, details=error.details)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._observed_end()
            self.client.exchange_finished(self)

    def _observed_end(self) -> None:
        # Called once: finish() and abandon() both check `finished` first.
        if self.observers.active:
            self.ctx.ended = time.monotonic()
            self.observers.finish(self.ctx)
