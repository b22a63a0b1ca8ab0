"""What the micro-benchmarks share: a gateway on plain objects and request heads as the parser sees them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import httptools

from fastproxy.config import Config, parse_config
from fastproxy.context import RequestHead


def gateway_config(folder: Path, key: str, *, groups: list[str] = (), **sections) -> Config:
    """One cluster "prod" and one static access key, plus any further top-level sections."""
    (folder / "token").write_text("gateway-token")
    return parse_config({
        "clusters": [{"name": "prod", "server": "https://10.0.0.1:6443", "token_file": str(folder / "token")}],
        "access_keys": [{"name": "static", "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                         "user": "bench-user", "groups": list(groups)}],
        **sections,
    })


class NullTransport:
    """Takes every byte and does nothing: what is measured is the gateway's own work."""

    def write(self, data): pass
    def writelines(self, parts): pass
    def pause_reading(self): pass
    def resume_reading(self): pass
    def is_closing(self): return False
    def set_write_buffer_limits(self, high, low): pass
    def get_extra_info(self, name): return None
    def close(self): pass
    def abort(self): pass


class NullClient:
    """A client connection as a responder sees it (exchange.Connection), writing nowhere."""

    transport = NullTransport()
    write_paused = False
    active = None

    def set_deadline(self, kind, seconds): pass
    def clear_deadline(self, kind): pass
    def exchange_finished(self, exchange): pass


def plan(gateway, head: RequestHead):
    """Route a head through the gateway's router to its responder, as the connection does."""
    return gateway.responder(NullClient(), head, True)


class _Collector:
    """The callbacks the client protocol registers, collecting the head the same way."""

    def __init__(self):
        self.url = b""
        self.headers = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))


def parse_head(raw: bytes, client_ip: bytes = b"10.0.0.7") -> RequestHead:
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    parser.feed_data(raw)
    return RequestHead(parser.get_method(), collector.url, b"1.1", collector.headers, client_ip)
