"""A small blocking client of etcd's v3 JSON gateway (gRPC-gateway on every member's client URL).

Why not a gRPC client library: grpcio is a large native dependency with threads of its own that
must not cross the fork of the workers, and the store needs only four calls (range, txn, lease
grant, watch), which the gateway serves as plain HTTP/1.1 + JSON. Keys and values travel base64;
64-bit numbers travel as decimal strings.

Members are tried in turn: a connection error, a timeout or an "unavailable" answer moves to the
next one; when none answers the call raises UnavailableError naming the cause.
"""
from __future__ import annotations

import base64
import http.client
import os
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..config import EtcdConfig
from .base import StoreError, UnavailableError

# gRPC codes etcd answers with when the member cannot serve now (another member may).
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range of every key starting with `prefix` (its last byte plus one)."""
    data = prefix.encode()
    return b64(data[:-1] + bytes([data[-1] + 1]))


class CompactedError(StoreError):
    """A watch asked for revisions etcd has compacted away: reload, then watch from the reload's revision."""

    def __init__(self, compact_revision: int):
        super().__init__(f"etcd compacted past the watched revision (now at {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(unb64(raw["key"]).decode(), unb64(raw.get("value", "")), int(raw.get("mod_revision", 0)))


class EtcdClient:
    """Blocking calls to one etcd cluster; safe to share between threads; a forked child connects anew."""

    def __init__(self, config: EtcdConfig):
        self.config = config
        self.endpoints = [urlsplit(endpoint) for endpoint in config.endpoints]
        self.tls: ssl.SSLContext | None = None
        if any(endpoint.scheme == "https" for endpoint in self.endpoints):
            self.tls = ssl.create_default_context(cafile=config.ca_file)
            if config.cert_file is not None:
                self.tls.load_cert_chain(config.cert_file, config.key_file)
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._pid = 0
        self._current = 0  # the member that answered last

    def _connect(self, index: int, timeout: float) -> http.client.HTTPConnection:
        endpoint = self.endpoints[index]
        host, port = endpoint.hostname or "", endpoint.port
        if endpoint.scheme == "https":
            return http.client.HTTPSConnection(host, port or 2379, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(host, port or 2379, timeout=timeout)

    def _post(self, connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
        # hasleader: a member that loses its leader ends the watch (else it would stay open and
        # silent, a partition unnoticed) and refuses requests rather than serve what it last knew.
        connection.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json",
                                                              "Grpc-Metadata-hasleader": "true"})
        return connection.getresponse()

    def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v3/`method`; the answer's JSON. UnavailableError if no member answers."""
        with self._lock:
            if self._pid != os.getpid():
                self._connection, self._pid = None, os.getpid()  # never use the parent's socket
            causes = []
            for attempt in range(len(self.endpoints)):
                index = (self._current + attempt) % len(self.endpoints)
                try:
                    if self._connection is None or index != self._current:
                        self._close()
                        self._connection, self._current = self._connect(index, self.config.timeout), index
                    response = self._post(self._connection, f"/v3/{method}", body)
                    answer = orjson.loads(response.read() or b"{}")
                except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as error:
                    self._close()
                    causes.append(f"{self.config.endpoints[index]}: {error or type(error).__name__}")
                    continue
                if response.status == 200:
                    return answer  # type: ignore[no-any-return]
                if answer.get("code") in _UNAVAILABLE_CODES:
                    self._close()
                    causes.append(f"{self.config.endpoints[index]}: {answer.get('error') or answer.get('message')}")
                    continue
                raise StoreError(f"etcd refused {method}: {answer.get('error') or answer.get('message') or response.status}")
            raise UnavailableError(f"etcd is unreachable ({'; '.join(causes)})")

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._close()
            self._connection = None

    # ---- the calls the store makes ----

    def range(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(revision, every key under `prefix`), one consistent read."""
        answer = self.call("kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return int(answer["header"]["revision"]), [_kv(raw) for raw in answer.get("kvs", ())]

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, int, list[dict[str, Any]]]:
        """(whether every comparison held and `success` ran, else `failure`; the revision after; the
        answers of the operations that ran)."""
        body = {"compare": compare, "success": success}
        answer = self.call("kv/txn", {**body, "failure": failure} if failure else body)
        return bool(answer.get("succeeded")), int(answer["header"]["revision"]), answer.get("responses", [])

    def grant_lease(self, ttl: int) -> str:
        return str(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def watch(self, prefix: str, start_revision: int, idle_timeout: float) -> Iterator[list[WatchEvent]]:
        """Yield the events from `start_revision` on, a batch at a time; the first batch is empty,
        once the watch is in place. Ends when nothing came for `idle_timeout` seconds (the caller
        watches again from where it was, which also proves a member still answers).
        UnavailableError if no member accepts the watch, CompactedError if `start_revision` is gone."""
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        causes = []
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            connection = self._connect(index, self.config.timeout)
            try:
                response = self._post(connection, "/v3/watch", body)
                if response.status != 200:
                    causes.append(f"{self.config.endpoints[index]}: HTTP {response.status}")
                    continue
                first = response.readline()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                causes.append(f"{self.config.endpoints[index]}: {error or type(error).__name__}")
                continue
            yield from self._watch_stream(connection, response, first, idle_timeout)
            return
        raise UnavailableError(f"etcd is unreachable ({'; '.join(causes)})")

    def _watch_stream(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, line: bytes,
                      idle_timeout: float) -> Iterator[list[WatchEvent]]:
        try:
            if connection.sock is not None:
                connection.sock.settimeout(idle_timeout)
            while line:
                result = orjson.loads(line).get("result") or {}
                if result.get("compact_revision") and result.get("canceled"):
                    raise CompactedError(int(result["compact_revision"]))
                if result.get("canceled"):
                    raise UnavailableError(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
                yield [WatchEvent(event.get("type") == "DELETE", _kv(event["kv"])) for event in result.get("events", ())]
                line = response.readline()
        except TimeoutError:
            return  # idle: the caller watches again
        except (OSError, http.client.HTTPException) as error:
            raise UnavailableError(f"etcd watch broke: {error or type(error).__name__}") from None
        finally:
            connection.close()
        raise UnavailableError("etcd ended the watch")
