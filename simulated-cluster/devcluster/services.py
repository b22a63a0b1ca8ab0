"""The service proxy, `/api/v1/namespaces/NS/services/NAME/proxy/...`: the cluster passes a request
on to a service's backend, here another devcluster (a virtual cluster running in namespace NS).

`--service NS/NAME=DIR` names the backend by its state directory; its URL, CA and gateway token
are read from DIR/ready.json on each request, so the two may start in either order. The caller
is authenticated and authorised for `services/proxy` as itself; the backend then gets the rest
of the request with the backend's own credential in place of the caller's `Authorization`.
Simulation's licence: Impersonate-* headers are passed on to the backend (they are meant for
the virtual cluster, which checks them with its own rules) rather than applied here.

Responses stream back as they arrive (watches, followed logs); an upgrade (exec, attach,
port-forward) becomes a byte tunnel once the backend answers 101.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .auth import Attributes
from .errors import ApiError
from .streams import UpgradedInput

# Headers of one hop, and those the proxy sets itself.
_NOT_FORWARDED = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                            "upgrade", "host", "authorization", "content-length"))
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Backend:
    url: str
    ca_file: str
    token: str

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def parse_service_map(values: list[str]) -> dict[tuple[str, str], Path]:
    """`--service NS/NAME=DIR` options -> {(namespace, name): directory}; ValueError names a bad one."""
    services = {}
    for value in values:
        where, sep, directory = value.partition("=")
        namespace, slash, name = where.partition("/")
        if not sep or not slash or not namespace or not name or not directory:
            raise ValueError(f"--service must be NAMESPACE/NAME=DIR, not {value!r}")
        services[(namespace, name)] = Path(directory)
    return services


def service_name(name: str) -> str:
    """The service of a proxy path's name segment: `NAME`, `NAME:PORT` or `SCHEME:NAME:PORT`."""
    parts = name.split(":")
    return parts[1] if len(parts) == 3 else parts[0]


def is_service_proxy(attrs: Attributes) -> bool:
    return attrs.is_resource and not attrs.api_group and attrs.resource == "services" \
        and attrs.subresource == "proxy" and bool(attrs.namespace) and bool(attrs.name)


def backend_path(raw_path: str, attrs: Attributes) -> str:
    """The path below `.../services/NAME/proxy`, as the backend serves it."""
    marker = f"/services/{attrs.name}/proxy"
    rest = raw_path[raw_path.index(marker) + len(marker):]
    return rest if rest.startswith("/") else "/" + rest


def read_backend(directory: Path) -> Backend:
    try:
        ready = json.loads((directory / "ready.json").read_text())
        token = Path(ready["gateway_token_file"]).read_text().strip()
        return Backend(ready["url"], ready["ca_file"], token)
    except (OSError, ValueError, KeyError):
        raise ApiError(503, f"no endpoints available for service in {directory}") from None


def forwarded_headers(request: web.Request, backend: Backend) -> list[tuple[str, str]]:
    headers = [(name, value) for name, value in request.headers.items() if name.lower() not in _NOT_FORWARDED]
    return [("Host", urlsplit(backend.url).netloc), ("Authorization", f"Bearer {backend.token}"), *headers]


async def serve_service_proxy(request: web.Request, services: dict[tuple[str, str], Path],
                              attrs: Attributes) -> web.StreamResponse:
    directory = services.get((attrs.namespace, service_name(attrs.name)))
    if directory is None:
        raise ApiError(404, f'services "{service_name(attrs.name)}" not found', name=service_name(attrs.name),
                       kind="services")
    backend = read_backend(directory)
    target = backend_path(request.rel_url.raw_path, attrs) + (f"?{request.rel_url.raw_query_string}"
                                                              if request.rel_url.raw_query_string else "")
    if request.headers.get("Upgrade"):
        return await _tunnel(request, backend, target)
    return await _relay(request, backend, target)


async def _relay(request: web.Request, backend: Backend, target: str) -> web.StreamResponse:
    body = await request.read()
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.request(request.method, backend.url + target, headers=forwarded_headers(request, backend),
                                   data=body or None, ssl=backend.ssl_context(), allow_redirects=False) as answer:
            response = web.StreamResponse(status=answer.status, headers=[
                (name, value) for name, value in answer.headers.items() if name.lower() not in _NOT_FORWARDED])
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response


async def _tunnel(request: web.Request, backend: Backend, target: str) -> web.StreamResponse:
    url = urlsplit(backend.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port, ssl=backend.ssl_context())
    try:
        lines = [f"{request.method} {target} HTTP/1.1", "Connection: Upgrade", f"Upgrade: {request.headers['Upgrade']}",
                 *(f"{name}: {value}" for name, value in forwarded_headers(request, backend))]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 101:
            length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
            body = await reader.readexactly(length)
            return web.Response(status=status, body=body, headers=[
                (name, value) for name, value in headers if name.lower() not in _NOT_FORWARDED])
        response = web.StreamResponse(status=101, headers=[
            (name, value) for name, value in headers if name.lower() not in ("transfer-encoding", "content-length")])
        response.force_close()
        upgraded = UpgradedInput()
        request.protocol.set_parser(upgraded)
        client = await response.prepare(request)
        assert client is not None

        async def to_backend() -> None:
            while data := await upgraded.reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()

        async def to_client() -> None:
            while data := await reader.read(_CHUNK):
                await client.write(data)

        pumps = [asyncio.ensure_future(to_backend()), asyncio.ensure_future(to_client())]
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        return response
    finally:
        writer.close()


def _parse_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    headers = [(name.strip(), value.strip()) for name, _, value in
               (line.partition(":") for line in header_lines if line)]
    return int(status_line.split(" ", 2)[1]), headers
