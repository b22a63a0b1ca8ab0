"""The gateway's worker run in a thread of the test process, so tests can hand it observers and
reach its cluster registry, while clients and clusters stay real sockets and real TLS."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastproxy.config import load_config
from fastproxy.context import Observer, RequestContext
from fastproxy.server import Worker, listening_socket


@dataclass
class Seen:
    """What an observer saw of one request: its context at start, and a copy at finish."""

    ctx: RequestContext
    starts: int = 0
    finishes: int = 0
    at_finish: dict = field(default_factory=dict)


class RecordingObserver:
    def __init__(self):
        self.seen: dict[int, Seen] = {}
        self.order: list[Seen] = []
        self.lock = threading.Lock()

    def start(self, ctx: RequestContext) -> None:
        with self.lock:
            seen = self.seen.get(id(ctx))
            if seen is None:
                seen = self.seen[id(ctx)] = Seen(ctx)
                self.order.append(seen)
            seen.starts += 1

    def finish(self, ctx: RequestContext) -> None:
        info = ctx.info
        with self.lock:
            seen = self.seen.setdefault(id(ctx), Seen(ctx))
            seen.finishes += 1
            seen.at_finish = {
                "status": ctx.status, "bytes_in": ctx.bytes_in, "bytes_out": ctx.bytes_out,
                "route": ctx.route, "user": ctx.identity.user if ctx.identity else None,
                "verb": info.verb if info else None, "resource": info.resource if info else None,
                "subresource": info.subresource if info else None, "namespace": info.namespace if info else None,
                "name": info.name if info else None, "message": ctx.message,
                "first_byte": ctx.first_byte, "duration": ctx.ended - ctx.started,
            }

    def finished(self) -> list[Seen]:
        with self.lock:
            return [seen for seen in self.order if seen.finishes]

    def wait_finished(self, count: int, timeout: float = 5.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while len(self.finished()) < count:
            assert time.monotonic() < deadline, f"{len(self.finished())} of {count} requests finished"
            time.sleep(0.01)
        return self.finished()

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()
            self.order.clear()


class InProcessGateway:
    def __init__(self, config_text: str, folder, observers: Sequence[Observer] = ()):
        config_file = folder / "inprocess.toml"
        config_file.write_text(config_text)
        self.config = load_config(str(config_file))
        sock = listening_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.worker: Worker | None = None
        ready = threading.Event()

        def run() -> None:
            self.worker = Worker(self.config, sock, observers, handle_signals=False)
            ready.set()
            self.worker.run()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def gateway(self):
        return self.worker.gateway

    def call(self, fn, *args):
        """Run fn(*args) on the gateway's event loop and return its result."""
        async def wrapped():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapped(), self.worker.loop).result(5)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(15)
