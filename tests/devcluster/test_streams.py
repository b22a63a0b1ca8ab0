"""exec, attach and port-forward over real sockets.

First the handlers alone, mounted in a small aiohttp app and driven by the
`websockets` library and by a SPDY client built on devcluster.spdy's
codec; then the real kubectl against a devcluster process.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import select
import socket
import subprocess
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import pytest
import websockets
from aiohttp import web
from websockets.asyncio.client import connect

from devcluster import spdy, streams
from devcluster.spdy import DataFrame, GoAway, SynReply, SynStream

POD = {
    "metadata": {"name": "web-0", "namespace": "demo"},
    "spec": {"containers": [{"name": "app", "env": [{"name": "GREETING", "value": "hello"}]},
                            {"name": "sidecar"}]},
}
POD_PATH = "/api/v1/namespaces/demo/pods/web-0"
HANDLERS = {"exec": streams.handle_exec, "attach": streams.handle_attach,
            "portforward": streams.handle_portforward}
SUCCESS = {"metadata": {}, "status": "Success"}
V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"


def run_async(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=15))
    return run


def exit_status(code: int) -> dict:
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


@dataclass
class PodServer:
    port: int
    finished: asyncio.Queue[str] = field(default_factory=asyncio.Queue)  # subresources whose handler returned

    def url(self, scheme: str, subresource: str, **query) -> str:
        return f"{scheme}://127.0.0.1:{self.port}{POD_PATH}/{subresource}?{urlencode(query, doseq=True)}"

    def exec_url(self, *command: str, **options: str) -> str:
        return self.url("ws", "exec", **command_query(*command, **options))


def command_query(*command: str, **options: str) -> dict:
    return {"command": list(command), "container": "app", "stdout": "true", "stderr": "true", **options}


@contextlib.asynccontextmanager
async def pod_server():
    server = PodServer(0)

    async def route(request: web.Request) -> web.StreamResponse:
        subresource = request.match_info["subresource"]
        try:
            return await HANDLERS[subresource](request, POD)
        finally:
            server.finished.put_nowait(subresource)

    app = web.Application()
    app.router.add_route("*", POD_PATH + "/{subresource}", route)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


async def websocket_session(url: str, *to_send: bytes, protocols=(V5, V4)) -> tuple[str, dict[int, bytes]]:
    """Sends messages, then collects what arrives on each channel until the server closes."""
    async with connect(url, subprotocols=list(protocols), proxy=None, compression=None) as websocket:
        for message in to_send:
            await websocket.send(message)
        channels: dict[int, bytes] = defaultdict(bytes)
        async for message in websocket:
            channels[message[0]] += message[1:]
    assert websocket.close_code == 1000
    return websocket.subprotocol, dict(channels)


# --- exec and attach over WebSocket ----------------------------------------------------------


@run_async
async def test_websocket_exec_runs_a_command_and_reports_success():
    async with pod_server() as server:
        protocol, channels = await websocket_session(server.exec_url("echo", "hi", "there"))
    assert protocol == V5
    assert channels.keys() == {streams.STDOUT, streams.ERROR}
    assert channels[streams.STDOUT] == b"hi there\n"
    assert json.loads(channels[streams.ERROR]) == SUCCESS


@run_async
async def test_websocket_exec_copies_stdin_until_the_client_closes_it():
    async with pod_server() as server:
        _, channels = await websocket_session(
            server.exec_url("cat", stdin="true"),
            b"\x00line one\n", b"\x00", b'\x04{"Width":80,"Height":24}', b"\x00line two\n", b"\xff\x00")
    assert channels[streams.STDOUT] == b"line one\nline two\n"
    assert json.loads(channels[streams.ERROR]) == SUCCESS


@run_async
async def test_websocket_exec_reports_non_zero_exit_codes():
    async with pod_server() as server:
        _, exited = await websocket_session(server.exec_url("sh", "-c", "exit 3"))
        _, failed = await websocket_session(server.exec_url("false"))
        _, missing = await websocket_session(server.exec_url("/usr/bin/nope", "-x"))
    assert json.loads(exited[streams.ERROR]) == exit_status(3)
    assert json.loads(failed[streams.ERROR]) == exit_status(1)
    assert missing[streams.STDERR] == b"sh: /usr/bin/nope: not found\n"
    assert json.loads(missing[streams.ERROR]) == exit_status(127)


@run_async
async def test_websocket_exec_builtins_see_the_pod():
    async with pod_server() as server:
        _, env = await websocket_session(server.exec_url("env"))
        _, hostname = await websocket_session(server.exec_url("sh", "-c", "hostname"))
        _, slept = await websocket_session(server.exec_url("sleep", "0.01"))
    assert {"HOSTNAME=web-0", "GREETING=hello"} <= set(env[streams.STDOUT].decode().splitlines())
    assert hostname[streams.STDOUT] == b"web-0\n"
    assert json.loads(slept[streams.ERROR]) == SUCCESS


@run_async
async def test_websocket_exec_with_tty_sends_stderr_on_stdout():
    async with pod_server() as server:
        _, channels = await websocket_session(server.exec_url("nope", tty="true", stderr="false"))
    assert channels[streams.STDOUT] == b"sh: nope: not found\n"


@run_async
async def test_websocket_exec_prefers_v5_and_speaks_v4():
    async with pod_server() as server:
        preferred, _ = await websocket_session(server.exec_url("true"), protocols=(V4, V5))
        older, channels = await websocket_session(server.exec_url("echo", "v4"), protocols=(V4,))
    assert (preferred, older) == (V5, V4)
    assert channels[streams.STDOUT] == b"v4\n"
    assert json.loads(channels[streams.ERROR]) == SUCCESS


@pytest.mark.parametrize("query, protocols, message", [
    (command_query("echo", container="db"), (V5,), "container db is not valid for pod web-0"),
    (command_query("echo", container=""), (V5,),
     "a container name must be specified for pod web-0, choose one of: [app sidecar]"),
    (command_query(), (V5,), "you must specify at least 1 command"),
    (command_query("echo"), ("base64.channel.k8s.io",),
     "unable to upgrade: supported subprotocols are v5.channel.k8s.io, v4.channel.k8s.io"),
])
@run_async
async def test_websocket_exec_refusals_are_status_objects(query, protocols, message):
    async with pod_server() as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websocket_session(server.url("ws", "exec", **query), protocols=protocols)
    assert refused.value.response.status_code == 400
    assert json.loads(refused.value.response.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "BadRequest", "code": 400}


@run_async
async def test_websocket_attach_echoes_stdin():
    async with pod_server() as server:
        _, channels = await websocket_session(
            server.url("ws", "attach", container="app", stdin="true", stdout="true", stderr="true"),
            b"\x00are you there?\n", b"\xff\x00")
    assert channels.keys() == {streams.STDOUT, streams.ERROR}
    assert channels[streams.STDOUT] == b"are you there?\n"
    assert json.loads(channels[streams.ERROR]) == SUCCESS


@run_async
async def test_websocket_commands_stop_when_the_client_leaves():
    async with pod_server() as server:
        attach_url = server.url("ws", "attach", container="app", stdout="true")
        for url in (server.exec_url("sleep", "30"), attach_url):
            async with connect(url, subprotocols=[V5], proxy=None):
                pass
            assert await asyncio.wait_for(server.finished.get(), 2) in ("exec", "attach")


# --- a SPDY/3.1 client ----------------------------------------------------------------------


class SpdyClient:
    """Opens streams on a SPDY session and records what the server sends on each."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]):
        self.codec = spdy.FrameCodec()
        self._write = write
        self._next_stream_id = 1
        self.replied: set[int] = set()
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.finished: set[int] = set()
        self.control: list = []  # other control frames, in arrival order
        self._changed = asyncio.Condition()
        self._receiver = asyncio.create_task(self._receive(read))

    async def _receive(self, read) -> None:
        while chunk := await read():
            for frame in self.codec.feed(chunk):
                match frame:
                    case SynReply(stream_id):
                        self.replied.add(stream_id)
                    case DataFrame(stream_id, data, fin):
                        self.data[stream_id] += data
                        if fin:
                            self.finished.add(stream_id)
                    case _:
                        self.control.append(frame)
            async with self._changed:
                self._changed.notify_all()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), 5)

    async def open(self, **headers: str) -> int:
        stream_id, self._next_stream_id = self._next_stream_id, self._next_stream_id + 2
        await self._write(self.codec.encode(SynStream(stream_id, headers)))
        await self.until(lambda: stream_id in self.replied)
        return stream_id

    async def open_streams(self, *kinds: str) -> list[int]:
        return [await self.open(streamtype=kind) for kind in kinds]

    async def send(self, stream_id: int, data: bytes = b"", fin: bool = False) -> None:
        await self._write(self.codec.encode(DataFrame(stream_id, data, fin)))

    async def read_all(self, stream_id: int) -> bytes:
        await self.until(lambda: stream_id in self.finished)
        return bytes(self.data[stream_id])

    async def aclose(self) -> None:
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver


@dataclass
class Upgrade:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    client: SpdyClient | None

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@contextlib.asynccontextmanager
async def spdy_upgrade(server: PodServer, subresource: str, protocols: list[str], **query):
    """POSTs an upgrade to SPDY/3.1; on 101, speaks SPDY on the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = [f"POST {POD_PATH}/{subresource}?{urlencode(query, doseq=True)} HTTP/1.1",
               f"Host: 127.0.0.1:{server.port}", "Connection: Upgrade", "Upgrade: SPDY/3.1",
               *(f"X-Stream-Protocol-Version: {protocol}" for protocol in protocols),
               "Content-Length: 0", "", ""]
    writer.write("\r\n".join(request).encode())
    status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode().strip().split("\r\n")
    headers = [(name, value.strip()) for name, value in (line.split(":", 1) for line in header_lines)]
    upgrade = Upgrade(int(status_line.split()[1]), headers, b"", None)
    if upgrade.status == 101:
        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        upgrade.client = SpdyClient(functools.partial(reader.read, 65536), write)
    else:
        upgrade.body = await reader.readexactly(int(dict(headers)["Content-Length"]))
    try:
        yield upgrade
    finally:
        if upgrade.client is not None:
            await upgrade.client.aclose()
        writer.close()
        await writer.wait_closed()


# --- exec and attach over SPDY -------------------------------------------------------------


@run_async
async def test_spdy_exec_with_the_status_protocols():
    async with pod_server() as server:
        for offered, chosen in (([V5, V4], V5), ([V4, "channel.k8s.io"], V4)):
            async with spdy_upgrade(server, "exec", offered, **command_query("cat", stdin="true")) as upgrade:
                assert upgrade.status == 101
                assert upgrade.header("Upgrade") == ["SPDY/3.1"]
                assert upgrade.header("X-Stream-Protocol-Version") == [chosen]
                client = upgrade.client
                error, stdin, stdout, stderr = await client.open_streams("error", "stdin", "stdout", "stderr")
                await client.send(stdin, b"from stdin\n")
                await client.send(stdin, b"and more\n", fin=True)
                assert await client.read_all(stdout) == b"from stdin\nand more\n"
                assert await client.read_all(stderr) == b""
                assert json.loads(await client.read_all(error)) == SUCCESS
                await client.until(lambda c=client: c.control)
                assert client.control == [GoAway(7, spdy.GOAWAY_OK)]


@run_async
async def test_spdy_exec_exit_codes_by_protocol_version():
    async with pod_server() as server:
        async with spdy_upgrade(server, "exec", [V4], **command_query("sh", "-c", "exit 300")) as upgrade:
            error, _, _ = await upgrade.client.open_streams("error", "stdout", "stderr")
            assert json.loads(await upgrade.client.read_all(error)) == exit_status(44)
        async with spdy_upgrade(server, "exec", ["v2.channel.k8s.io"], **command_query("nope")) as upgrade:
            error, _, stderr = await upgrade.client.open_streams("error", "stdout", "stderr")
            assert await upgrade.client.read_all(stderr) == b"sh: nope: not found\n"
            assert await upgrade.client.read_all(error) == \
                b"command terminated with non-zero exit code: exit status 127"


@run_async
async def test_spdy_attach_with_tty_waits_for_the_resize_stream():
    async with pod_server() as server:
        query = {"container": "app", "stdin": "true", "stdout": "true", "stderr": "true", "tty": "true"}
        async with spdy_upgrade(server, "attach", [V4], **query) as upgrade:
            client = upgrade.client
            error, stdin, stdout = await client.open_streams("error", "stdin", "stdout")
            await client.send(stdin, b"typed\n")
            await asyncio.sleep(0.1)
            assert client.data[stdout] == b""  # nothing runs before every stream is open
            resize = await client.open(streamtype="resize")
            await client.send(resize, b'{"Width":80,"Height":24}')
            await client.until(lambda: client.data[stdout] == b"typed\n")
            await client.send(stdin, fin=True)
            assert json.loads(await client.read_all(error)) == SUCCESS


@run_async
async def test_spdy_refuses_protocols_it_does_not_speak_and_plain_requests():
    async with pod_server() as server:
        async with spdy_upgrade(server, "exec", ["channel.k8s.io"], **command_query("echo")) as upgrade:
            assert upgrade.status == 403
            supported = list(streams.SPDY_COMMAND_PROTOCOLS)
            assert upgrade.header("X-Accepted-Stream-Protocol-Versions") == supported
            assert json.loads(upgrade.body)["message"] == (
                "unable to upgrade: unable to negotiate protocol: client supports ['channel.k8s.io'], "
                f"server accepts {supported}")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {POD_PATH}/exec?command=ls&container=app HTTP/1.1\r\n"
                     "Host: x\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
        writer.close()
    assert response.startswith(b"HTTP/1.1 400 ")
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["message"] == "Upgrade request required"


@run_async
async def test_spdy_command_stops_when_the_client_leaves():
    async with pod_server() as server:
        async with spdy_upgrade(server, "exec", [V4], **command_query("sleep", "30")) as upgrade:
            await upgrade.client.open_streams("error", "stdout", "stderr")
        assert await asyncio.wait_for(server.finished.get(), 2) == "exec"


# --- port-forward -----------------------------------------------------------------------------


async def forward_through(client: SpdyClient, request_id: str, port: str = "80") -> tuple[int, int]:
    error = await client.open(streamtype="error", port=port, requestid=request_id)
    await client.send(error, fin=True)  # as kubectl does: it never writes there
    data = await client.open(streamtype="data", port=port, requestid=request_id)
    return error, data


async def check_echo_service(client: SpdyClient) -> None:
    first_error, first = await forward_through(client, "0")
    second_error, second = await forward_through(client, "1")
    await client.send(first, b"one")
    await client.send(second, b"two")
    await client.until(lambda: client.data[first] == b"one" and client.data[second] == b"two")
    await client.send(first, b"x" * 100_000, fin=True)
    assert await client.read_all(first) == b"one" + b"x" * 100_000
    assert await client.read_all(first_error) == b""
    assert second not in client.finished
    await client.send(second, fin=True)
    assert await client.read_all(second) == b"two"
    assert await client.read_all(second_error) == b""


@run_async
async def test_spdy_port_forward_echoes_on_every_connection():
    async with pod_server() as server:
        async with spdy_upgrade(server, "portforward", ["portforward.k8s.io"]) as upgrade:
            assert upgrade.header("X-Stream-Protocol-Version") == ["portforward.k8s.io"]
            await check_echo_service(upgrade.client)
            error, data = await forward_through(upgrade.client, "2", port="http")
            assert await upgrade.client.read_all(error) == b"invalid port 'http'"
            assert await upgrade.client.read_all(data) == b""
        assert await asyncio.wait_for(server.finished.get(), 2) == "portforward"


@run_async
async def test_port_forward_tunnelled_in_websocket_messages():
    # aiohttp's client here: `websockets` refuses the "/" kubectl puts in this subprotocol's name.
    async with pod_server() as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(server.url("http", "portforward"),
                                      protocols=[streams.TUNNELED_PORT_FORWARD_PROTOCOL]) as websocket:
            assert websocket.protocol == "SPDY/3.1+portforward.k8s.io"

            async def write_in_pieces(data: bytes) -> None:  # every frame split across messages
                middle = max(5, len(data) // 2)
                for piece in (data[:5], data[5:middle], data[middle:]):
                    await websocket.send_bytes(piece)

            async def read() -> bytes:
                message = await websocket.receive()
                return message.data if message.type is aiohttp.WSMsgType.BINARY else b""

            client = SpdyClient(read, write_in_pieces)
            await check_echo_service(client)
            await client.aclose()
        assert await asyncio.wait_for(server.finished.get(), 2) == "portforward"


@run_async
async def test_port_forward_refusals():
    async with pod_server() as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(server.url("ws", "portforward"), subprotocols=[V4], proxy=None):
                pass
        assert refused.value.response.status_code == 400
        async with spdy_upgrade(server, "portforward", [V4]) as upgrade:
            assert upgrade.status == 403
            assert upgrade.header("X-Accepted-Stream-Protocol-Versions") == ["portforward.k8s.io"]


# --- the real kubectl against the devcluster (conftest's session-wide `kubectl`) ----------------

KUBECTL_POD = "hello"  # seeded in the default namespace; only read here, so other tests see no change
TRANSPORTS = {"websocket": {}, "spdy": {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false",
                                        "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}}
UPGRADE_METHOD = {"websocket": "GET", "spdy": "POST"}


def kubectl_command(kubectl, *args: str) -> list[str]:
    return kubectl.command(args, "admin")


def kubectl_environment(kubectl, transport: str) -> dict[str, str]:
    return {**kubectl.env(), **TRANSPORTS[transport]}


def run_kubectl(kubectl, *args: str, transport: str = "websocket",
                stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(kubectl_command(kubectl, *args), input=stdin, capture_output=True, text=True,
                          timeout=20, env=kubectl_environment(kubectl, transport))


def upgraded(log: str, transport: str, subresource: str) -> bool:
    """Whether kubectl's -v=6 log shows the upgrade made with the transport's HTTP method."""
    method = UPGRADE_METHOD[transport]
    pattern = rf"{method} https://\S+/pods/{KUBECTL_POD}/{subresource}\S* 101 Switching Protocols"
    return re.search(pattern, log) is not None


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kubectl_exec_prints_the_commands_output(kubectl, transport):
    result = run_kubectl(kubectl, "exec", KUBECTL_POD, "--", "echo", "hi", transport=transport)
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")
    logged = run_kubectl(kubectl, "exec", "-v=6", KUBECTL_POD, "--", "true", transport=transport)
    assert logged.returncode == 0 and upgraded(logged.stderr, transport, "exec")


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kubectl_exec_passes_stdin(kubectl, transport):
    text = "".join(f"line {number}\n" for number in range(5000))
    result = run_kubectl(kubectl, "exec", "-i", KUBECTL_POD, "--", "cat", transport=transport, stdin=text)
    assert (result.returncode, result.stdout, result.stderr) == (0, text, "")


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kubectl_exec_exits_with_the_commands_code(kubectl, transport):
    result = run_kubectl(kubectl, "exec", KUBECTL_POD, "--", "sh", "-c", "exit 3", transport=transport)
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == "command terminated with exit code 3\n"
    missing = run_kubectl(kubectl, "exec", KUBECTL_POD, "--", "nope", transport=transport)
    assert (missing.returncode, missing.stderr) == (
        127, "sh: nope: not found\ncommand terminated with exit code 127\n")


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kubectl_attach_echoes_stdin(kubectl, transport):
    result = run_kubectl(kubectl, "attach", "-i", KUBECTL_POD, transport=transport, stdin="anyone home?\n")
    assert (result.returncode, result.stdout) == (0, "anyone home?\n")


def send_and_read_back(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kubectl_port_forward_carries_bytes_both_ways(kubectl, transport, tmp_path):
    log = tmp_path / "port-forward.log"
    command = kubectl_command(kubectl, "port-forward", "-v=6", "--address", "127.0.0.1",
                              f"pod/{KUBECTL_POD}", ":80")
    environment = kubectl_environment(kubectl, transport)
    with log.open("w") as log_file, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file,
                                                     text=True, env=environment) as forward:
        try:
            assert select.select([forward.stdout], [], [], 10)[0], "kubectl port-forward did not start"
            line = forward.stdout.readline()
            local_port = int(re.fullmatch(r"Forwarding from 127\.0\.0\.1:(\d+) -> 80\n", line)[1])
            for payload in (b"hello through the tunnel\n", bytes(range(256)) * 1000):
                assert send_and_read_back(local_port, payload) == payload
        finally:
            forward.terminate()  # leaving the block waits for it
    assert upgraded(log.read_text(), transport, "portforward")
