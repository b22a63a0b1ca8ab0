"""In-process handlers: responses the gateway makes itself (health, the management API, ...).

A LocalResponder collects the request body (bounded), then `handle()` answers with one JSON or
text response, or streams a chunked response (a watch served by the gateway itself) with the
same backpressure as the proxy: `await drain()` waits while the client's buffer is full.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .exchange import Responder
from .status import StatusError, date_line, status_line

log = logging.getLogger("fastproxy.local")

JSON = b"application/json"
DEFAULT_BODY_LIMIT = 3 * 1024 * 1024  # the API server's own limit for a JSON request body


class LocalResponder(Responder):
    """Base of the handlers served in-process; subclasses implement `handle()`."""

    __slots__ = ("body", "body_size", "streaming", "handled", "task", "_drained")

    body_limit = DEFAULT_BODY_LIMIT

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.body: list[bytes] = []
        self.body_size = 0
        self.streaming = False
        self.handled = False
        self.task: asyncio.Task | None = None
        self._drained: asyncio.Future | None = None

    def handle(self) -> None:
        """Answer the request: `send`, `send_json`, or `begin_stream` ... `end_stream`."""
        raise NotImplementedError

    def on_closed(self) -> None:
        """The client went away before the response ended: release what the handler holds."""

    # --- driven by the client connection -----------------------------------------------------

    def serve(self) -> None:
        if self.request_done:
            self._handle()

    def request_body(self, data: bytes) -> None:
        if self.finished or self.canned:
            return
        self.ctx.bytes_in += len(data)
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self.body.clear()
            self.fail(413, f"request body larger than {self.body_limit} bytes", close=True)
            return
        self.body.append(data)

    def request_complete(self) -> None:
        self.request_done = True
        if self is self.client.active and not self.canned and not self.finished:
            self._handle()

    def writing_resumed(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def abandon(self) -> None:
        if self.finished:
            return
        if self.task is not None:
            self.task.cancel()
        self.writing_resumed()
        super().abandon()
        self.on_closed()

    def _handle(self) -> None:
        if self.handled:
            return
        self.handled = True
        try:
            self.handle()
        except StatusError as err:
            self._refuse(err)

    def _refuse(self, err: StatusError) -> None:
        if self.streaming:
            self.abort()
        else:
            self.refuse(err)

    # --- what handlers call ------------------------------------------------------------------

    def json_body(self) -> Any:
        """The request body parsed as JSON (400 when it is not)."""
        try:
            return orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError as exc:
            raise StatusError(400, f"request body is not valid JSON: {exc}") from None

    def send(self, status: int, body: bytes, content_type: bytes = JSON,
             headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """One complete response; never cached by clients or proxies."""
        parts = [status_line(status), date_line(), self.ctx.id_line, b"Content-Type: ", content_type,
                 b"\r\nCache-Control: no-store\r\nContent-Length: %d\r\n" % len(body)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n" if self.keep_alive else b"Connection: close\r\n\r\n")
        if self.ctx.head.method != b"HEAD":
            parts.append(body)
        self.respond(b"".join(parts), status)

    def send_json(self, status: int, obj: Any) -> None:
        self.send(status, orjson.dumps(obj))

    def begin_stream(self, status: int = 200, content_type: bytes = JSON) -> None:
        """Start a chunked response; each `send_chunk` reaches the client as one chunk."""
        self.streaming = True
        head = b"".join((status_line(status), date_line(), self.ctx.id_line, b"Content-Type: ", content_type,
                         b"\r\nCache-Control: no-store\r\nTransfer-Encoding: chunked\r\n",
                         b"\r\n" if self.keep_alive else b"Connection: close\r\n\r\n"))
        self.ctx.status = status
        self._write(head)

    def send_chunk(self, data: bytes) -> None:
        if data and not self.finished:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        if not self.finished:
            self._write(b"0\r\n\r\n")
            self.finish()

    async def drain(self) -> None:
        """Wait while the client's transport is above its high-water mark."""
        if self.client.write_paused and not self.finished:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Answer from a coroutine (a stream, or a request that waits on I/O); cancelled when
        the client leaves. A StatusError it raises becomes the response."""
        self.task = asyncio.get_running_loop().create_task(coro)
        self.task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task) -> None:
        self.task = None
        if task.cancelled():
            return
        err = task.exception()
        if err is None or self.finished:
            return
        if isinstance(err, StatusError):
            self._refuse(err)
        else:
            log.error("handler for %s failed", self.ctx.route, exc_info=err)
            self._refuse(StatusError(500, "internal error"))

    def abort(self) -> None:
        self.keep_alive = False
        self.client.transport.abort()
        self.finish()

    def _write(self, data: bytes) -> None:
        self.ctx.bytes_out += len(data)
        self.client.transport.write(data)


# A health check: None when it passes, else why it fails.
Check = Callable[[], str | None]

LIVE, READY = "livez", "readyz"
SHUTDOWN = "shutdown"  # the readyz check the worker adds: failing while it drains


class HealthChecks:
    """/livez (the worker's loop answers), /readyz (configuration, keys and clusters loaded, not
    draining) and /healthz (both, without the drain): `?verbose` lists each check as the API
    server does; a failing one makes the answer 500, or 503 when the drain alone fails it."""

    def __init__(self) -> None:
        self.checks: dict[str, dict[str, Check]] = {LIVE: {"ping": _passes}, READY: {"ping": _passes}}

    def add(self, endpoint: str, name: str, check: Check) -> None:
        self.checks[endpoint][name] = check

    def responder(self, client: Any, ctx: Any, observers: Any, keep_alive: bool) -> Health:
        health = Health(client, ctx, observers, keep_alive)
        health.checks = self
        return health

    def run(self, path: str) -> list[tuple[str, str | None]]:
        endpoint = path.strip("/")
        if endpoint in self.checks:
            checks = self.checks[endpoint]
        else:  # healthz: everything except the drain, which is not a health problem
            checks = {**self.checks[LIVE], **self.checks[READY]}
            checks.pop(SHUTDOWN, None)
        return [(name, check()) for name, check in checks.items()]


def health_report(endpoint: str, results: list[tuple[str, str | None]], verbose: bool) -> tuple[int, bytes]:
    """The status code and text body for a health endpoint's check results."""
    failed = [name for name, reason in results if reason is not None]
    if not failed and not verbose:
        return 200, b"ok"
    lines = [f"[+]{name} ok" if reason is None else f"[-]{name} failed: {reason}" for name, reason in results]
    lines.append(f"{endpoint} check {'failed' if failed else 'passed'}")
    code = 200 if not failed else 503 if failed == [SHUTDOWN] else 500
    return code, ("\n".join(lines) + "\n").encode()


def _passes() -> None:
    return None


class Health(LocalResponder):
    """One request to /healthz, /readyz or /livez."""

    __slots__ = ("checks",)
    checks: HealthChecks

    def handle(self) -> None:
        route = self.ctx.route
        assert route is not None  # routed here by it
        verbose = "verbose" in (name for name, _ in parse_qsl(route.query, keep_blank_values=True))
        code, body = health_report(route.path.strip("/"), self.checks.run(route.path), verbose)
        self.send(code, body, b"text/plain; charset=utf-8")
