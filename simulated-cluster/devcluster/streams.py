"""exec, attach and port-forward on the simulated cluster's pods.

The core server authenticates and authorises the request, looks the pod up and
hands it here. Two transports reach us, as they reach a real API server:

* WebSocket, kubectl's default: the ``v5``/``v4.channel.k8s.io`` channel
  protocols for exec and attach, and SPDY tunnelled in binary messages
  (``SPDY/3.1+portforward.k8s.io``) for port-forward;
* SPDY/3.1 on the upgraded HTTP connection, used by older clients and by
  kubectl with ``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`` or
  ``KUBECTL_PORT_FORWARD_WEBSOCKETS=false``.

Pods run no real processes: exec runs a few built-in commands, attach joins a
main process that echoes its stdin, and every forwarded port is an echo service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from . import errors, spdy
from .auth import is_true_flag

# Subprotocols we speak, in order of preference.
WEBSOCKET_COMMAND_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
# Over SPDY, v5 adds nothing to v4: a stream's end is its half-close.
SPDY_COMMAND_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io")
# Protocols whose error channel ends with a metav1.Status rather than plain text.
STATUS_PROTOCOLS = frozenset({"v5.channel.k8s.io", "v4.channel.k8s.io"})
PORT_FORWARD_PROTOCOL = "portforward.k8s.io"
TUNNELED_PORT_FORWARD_PROTOCOL = "SPDY/3.1+" + PORT_FORWARD_PROTOCOL

# WebSocket channel numbers (the first byte of every binary message); channel 4
# carries terminal resizes, which the fake processes have no use for.
STDIN, STDOUT, STDERR, ERROR = range(4)
CLOSE_CHANNEL = 255  # v5: [255, channel] ends that channel's input

# How long the client may take to open all the streams of an exec, and how
# long a finished session waits for the client to hang up.
STREAM_CREATION_TIMEOUT = 30.0
HANG_UP_GRACE = 5.0

Program = Callable[["PodProcess"], Awaitable[int]]
Reader = Callable[[], Awaitable[bytes]]
Writer = Callable[[bytes], Awaitable[None]]


async def handle_exec(request: web.Request, pod: dict) -> web.StreamResponse:
    command = request.query.getall("command", [])
    if not command:
        return _error_response(errors.bad_request("you must specify at least 1 command"))
    return await _serve_remote_command(request, pod, functools.partial(_run_command, command))


async def handle_attach(request: web.Request, pod: dict) -> web.StreamResponse:
    return await _serve_remote_command(request, pod, _main_process)


async def handle_portforward(request: web.Request, pod: dict) -> web.StreamResponse:
    match _upgrade_requested(request):
        case "websocket":
            return await _serve_port_forward_over_websocket(request)
        case "spdy":
            return await _serve_port_forward_over_spdy(request)
    return _error_response(errors.bad_request("Upgrade request required"))


# --- the fake pod's processes ----------------------------------------------------


@dataclass
class PodProcess:
    """What a built-in command sees: its pod, its environment and its standard streams."""

    pod_name: str
    environment: dict[str, str]
    has_stdin: bool
    read_stdin: Reader  # b"" at end of input
    write_stdout: Writer
    write_stderr: Writer


_ProcessFactory = Callable[[Reader, Writer, Writer], PodProcess]


async def _main_process(process: PodProcess) -> int:
    """The pod's main process, as attach sees it: echoes stdin until it closes."""
    if not process.has_stdin:
        await asyncio.Event().wait()  # runs, silently, until the client leaves
    return await _cat(process, [])


async def _run_command(argv: list[str], process: PodProcess) -> int:
    name = argv[0].rsplit("/", 1)[-1]
    builtin = _BUILTINS.get(name)
    if builtin is None:
        await process.write_stderr(f"sh: {argv[0]}: not found\n".encode())
        return 127
    return await builtin(process, argv[1:])


async def _echo(process: PodProcess, args: list[str]) -> int:
    await process.write_stdout((" ".join(args) + "\n").encode())
    return 0


async def _cat(process: PodProcess, args: list[str]) -> int:
    if args:
        await process.write_stderr(f"cat: {args[0]}: No such file or directory\n".encode())
        return 1
    while chunk := await process.read_stdin():
        await process.write_stdout(chunk)
    return 0


async def _env(process: PodProcess, args: list[str]) -> int:
    lines = "".join(f"{name}={value}\n" for name, value in process.environment.items())
    await process.write_stdout(lines.encode())
    return 0


async def _hostname(process: PodProcess, args: list[str]) -> int:
    await process.write_stdout(f"{process.pod_name}\n".encode())
    return 0


async def _sleep(process: PodProcess, args: list[str]) -> int:
    try:
        await asyncio.sleep(float(args[0]))
    except (IndexError, ValueError):
        await process.write_stderr(b"sleep: invalid time interval\n")
        return 1
    return 0


async def _shell(process: PodProcess, args: list[str]) -> int:
    """``sh -c SCRIPT``, where the script is one simple command or ``exit N``."""
    if len(args) < 2 or args[0] != "-c":
        await process.write_stderr(b"sh: only 'sh -c COMMAND' is supported\n")
        return 2
    try:
        words = shlex.split(args[1])
    except ValueError as error:
        await process.write_stderr(f"sh: syntax error: {error}\n".encode())
        return 2
    if not words:
        return 0
    if words[0] != "exit":
        return await _run_command(words, process)
    try:
        return int(words[1]) % 256 if len(words) > 1 else 0
    except ValueError:
        await process.write_stderr(f"sh: exit: Illegal number: {words[1]}\n".encode())
        return 2


async def _true(process: PodProcess, args: list[str]) -> int:
    return 0


async def _false(process: PodProcess, args: list[str]) -> int:
    return 1


_BUILTINS: dict[str, Callable[[PodProcess, list[str]], Awaitable[int]]] = {
    "echo": _echo,
    "cat": _cat,
    "env": _env,
    "hostname": _hostname,
    "sleep": _sleep,
    "sh": _shell,
    "bash": _shell,
    "true": _true,
    "false": _false,
}


def _environment(pod: dict, container: dict) -> dict[str, str]:
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOSTNAME": pod["metadata"]["name"],
        "HOME": "/root",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    environment.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return environment


# --- exec and attach ------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def from_query(cls, request: web.Request) -> _StreamOptions:
        query = request.query
        return cls(*(is_true_flag(query.get(name)) for name in ("stdin", "stdout", "stderr", "tty")))


async def _serve_remote_command(request: web.Request, pod: dict, program: Program) -> web.StreamResponse:
    container = _find_container(request, pod)
    if isinstance(container, errors.ApiError):
        return _error_response(container)
    options = _StreamOptions.from_query(request)

    def make_process(read_stdin: Reader, write_stdout: Writer, write_stderr: Writer) -> PodProcess:
        return PodProcess(pod["metadata"]["name"], _environment(pod, container), options.stdin,
                          read_stdin, write_stdout, write_stderr)

    match _upgrade_requested(request):
        case "websocket":
            return await _serve_command_over_websocket(request, options, program, make_process)
        case "spdy":
            return await _serve_command_over_spdy(request, options, program, make_process)
    return _error_response(errors.bad_request("Upgrade request required"))


def _find_container(request: web.Request, pod: dict) -> dict | errors.ApiError:
    containers = pod.get("spec", {}).get("containers", [])
    pod_name = pod["metadata"]["name"]
    name = request.query.get("container")
    if not name:
        if len(containers) == 1:
            return containers[0]
        names = " ".join(container["name"] for container in containers)
        return errors.bad_request(
            f"a container name must be specified for pod {pod_name}, choose one of: [{names}]")
    for container in containers:
        if container["name"] == name:
            return container
    return errors.bad_request(f"container {name} is not valid for pod {pod_name}")


async def _serve_command_over_websocket(request: web.Request, options: _StreamOptions, program: Program,
                                        make_process: _ProcessFactory) -> web.StreamResponse:
    protocol = _negotiate(_header_tokens(request, "Sec-WebSocket-Protocol"), WEBSOCKET_COMMAND_PROTOCOLS)
    if protocol is None:
        supported = ", ".join(WEBSOCKET_COMMAND_PROTOCOLS)
        return _error_response(errors.bad_request(
            f"unable to upgrade: supported subprotocols are {supported}"))
    websocket = web.WebSocketResponse(protocols=(protocol,))
    await websocket.prepare(request)
    stdin: asyncio.Queue[bytes] = asyncio.Queue()
    hung_up = asyncio.Event()

    async def receive_from_client() -> None:
        async for message in websocket:
            if message.type is not WSMsgType.BINARY or not message.data:
                continue
            channel, payload = message.data[0], message.data[1:]
            if channel == STDIN and payload:
                stdin.put_nowait(payload)
            elif channel == CLOSE_CHANNEL and payload[:1] == bytes([STDIN]):
                stdin.put_nowait(b"")
        stdin.put_nowait(b"")
        hung_up.set()

    async def read_stdin() -> bytes:
        chunk = await stdin.get() if options.stdin else b""
        if not chunk:
            stdin.put_nowait(b"")  # later reads see the end as well
        return chunk

    def sender(channel: int) -> Writer:
        async def send(data: bytes) -> None:
            await websocket.send_bytes(bytes([channel]) + data)

        return send

    receiver = asyncio.create_task(receive_from_client())
    process = make_process(read_stdin, sender(STDOUT), sender(STDOUT if options.tty else STDERR))
    exit_code = await _run_until_hang_up(program(process), hung_up)
    if exit_code is not None:
        with contextlib.suppress(ConnectionError):  # the client may leave meanwhile
            await sender(ERROR)(_exit_status(exit_code))
    await websocket.close()  # also ends the receiver's loop
    await receiver
    return websocket


async def _serve_command_over_spdy(request: web.Request, options: _StreamOptions, program: Program,
                                   make_process: _ProcessFactory) -> web.StreamResponse:
    protocol = _negotiate(_header_tokens(request, "X-Stream-Protocol-Version"), SPDY_COMMAND_PROTOCOLS)
    if protocol is None:
        return _protocol_refusal(request, SPDY_COMMAND_PROTOCOLS)
    expected = {"error"}
    expected |= {"stdin"} if options.stdin else set()
    expected |= {"stdout"} if options.stdout else set()
    expected |= {"stderr"} if options.stderr and not options.tty else set()
    expected |= {"resize"} if options.tty and protocol != "v2.channel.k8s.io" else set()
    response, session = await _accept_spdy(request, protocol)
    async with session:
        streams = await _collect_streams(session, expected)
        if streams is not None:
            write_stdout = streams["stdout"].write if "stdout" in streams else _discard
            write_stderr = streams["stderr"].write if "stderr" in streams else write_stdout
            read_stdin = streams["stdin"].read if "stdin" in streams else _no_input
            process = make_process(read_stdin, write_stdout, write_stderr)
            exit_code = await _run_until_hang_up(program(process), session.closed)
            if exit_code is not None:
                report = _exit_status if protocol in STATUS_PROTOCOLS else _exit_message
                await streams["error"].write(report(exit_code))
                for stream in streams.values():
                    await stream.close()
        await session.go_away()
        await session.wait_closed(HANG_UP_GRACE)
    return response


async def _collect_streams(session: spdy.Session, expected: set[str]) -> dict[str, spdy.Stream] | None:
    """Waits for the client to open one stream of each expected type."""
    streams: dict[str, spdy.Stream] = {}
    try:
        async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
            while streams.keys() != expected:
                stream = await session.accept()
                if stream is None:
                    return None
                kind = stream.headers.get("streamtype", "")
                if kind in expected and kind not in streams:
                    streams[kind] = stream
                else:
                    await stream.reset(spdy.REFUSED_STREAM)
    except TimeoutError:
        return None
    return streams


async def _run_until_hang_up(program: Awaitable[int], hung_up: asyncio.Event) -> int | None:
    """Runs ``program`` to its exit code, or None if the client left first."""
    run = asyncio.ensure_future(program)
    watch = asyncio.ensure_future(hung_up.wait())
    try:
        await asyncio.wait((run, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        run.cancel()  # no effect once it has finished
    await asyncio.wait((run,))
    if run.cancelled() or isinstance(run.exception(), ConnectionError):
        return None
    return run.result()


def _exit_status(exit_code: int) -> bytes:
    """The error channel's final message from v4 on: a metav1.Status."""
    if exit_code == 0:
        return b'{"metadata":{},"status":"Success"}'
    status = {
        "metadata": {},
        "status": "Failure",
        "message": _exit_text(exit_code),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }
    return json.dumps(status, separators=(",", ":")).encode()


def _exit_message(exit_code: int) -> bytes:
    """Before v4 the error stream carries plain text, and nothing on success."""
    return _exit_text(exit_code).encode() if exit_code else b""


def _exit_text(exit_code: int) -> str:
    return f"command terminated with non-zero exit code: exit status {exit_code}"


async def _discard(data: bytes) -> None:
    pass


async def _no_input() -> bytes:
    return b""


# --- port-forward -------------------------------------------------------------------


async def _serve_port_forward_over_websocket(request: web.Request) -> web.StreamResponse:
    if TUNNELED_PORT_FORWARD_PROTOCOL not in _header_tokens(request, "Sec-WebSocket-Protocol"):
        return _error_response(errors.bad_request(
            f"port-forward over WebSocket needs the {TUNNELED_PORT_FORWARD_PROTOCOL} subprotocol"))
    websocket = web.WebSocketResponse(protocols=(TUNNELED_PORT_FORWARD_PROTOCOL,))
    await websocket.prepare(request)
    async with spdy.Session(_websocket_bytes(websocket), websocket.send_bytes) as session:
        await _forward_ports(session)
    await websocket.close()
    return websocket


async def _serve_port_forward_over_spdy(request: web.Request) -> web.StreamResponse:
    if PORT_FORWARD_PROTOCOL not in _header_tokens(request, "X-Stream-Protocol-Version"):
        return _protocol_refusal(request, (PORT_FORWARD_PROTOCOL,))
    response, session = await _accept_spdy(request, PORT_FORWARD_PROTOCOL)
    async with session:
        await _forward_ports(session)
    return response


async def _forward_ports(session: spdy.Session) -> None:
    """Pairs the client's error and data streams by request id and serves each pair."""
    waiting: dict[str, dict[str, spdy.Stream]] = {}
    async with asyncio.TaskGroup() as forwards:
        while (stream := await session.accept()) is not None:
            request_id = stream.headers.get("requestid", "")
            pair = waiting.setdefault(request_id, {})
            kind = stream.headers.get("streamtype", "")
            if kind not in ("error", "data") or kind in pair:
                await stream.reset(spdy.PROTOCOL_ERROR)
                continue
            pair[kind] = stream
            if len(pair) == 2:
                del waiting[request_id]
                forwards.create_task(_echo_service(pair["error"], pair["data"]))


async def _echo_service(error: spdy.Stream, data: spdy.Stream) -> None:
    """What listens on every pod port: sends back whatever it receives."""
    port = data.headers.get("port", "")
    if port.isdigit() and 0 < int(port) < 65536:
        while chunk := await data.read():
            await data.write(chunk)
    else:
        await error.write(f"invalid port {port!r}".encode())
    await data.close()
    await error.close()


# --- transports ---------------------------------------------------------------------


def _upgrade_requested(request: web.Request) -> str | None:
    if "upgrade" not in request.headers.get("Connection", "").lower():
        return None
    upgrade = request.headers.get("Upgrade", "").lower()
    if upgrade == "websocket":
        return "websocket"
    if "spdy/3.1" in upgrade:
        return "spdy"
    return None


def _header_tokens(request: web.Request, name: str) -> list[str]:
    """Values of a header that may repeat and may hold comma-separated lists."""
    values = request.headers.getall(name, [])
    return [token.strip() for value in values for token in value.split(",") if token.strip()]


def _negotiate(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The protocol we like best among those the client offered."""
    return next((protocol for protocol in supported if protocol in offered), None)


def _protocol_refusal(request: web.Request, supported: tuple[str, ...]) -> web.Response:
    offered = _header_tokens(request, "X-Stream-Protocol-Version")
    response = _error_response(errors.ApiError(
        403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
             f"server accepts {list(supported)}"))
    for protocol in supported:
        response.headers.add("X-Accepted-Stream-Protocol-Versions", protocol)
    return response


class UpgradedInput:
    """Takes every byte that arrives after the 101, in place of aiohttp's HTTP parser."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


async def _accept_spdy(request: web.Request, protocol: str) -> tuple[web.StreamResponse, spdy.Session]:
    """Answers 101 and turns the connection into a SPDY session.

    aiohttp switches its parser off only for WebSocket upgrades, so it would
    read the SPDY frames after the 101 as more HTTP. Installing a payload
    parser on the connection's protocol - the hook aiohttp's own WebSocket
    support uses - hands every later byte to us instead; the client sends
    nothing before it has read the 101, so installing it first loses nothing.
    Writes go through the response's payload writer, which passes bytes
    through untouched (a 101 has no body framing) and applies backpressure.
    The handler's return then makes aiohttp close the connection
    (``force_close``), as nothing else may follow on it.
    """
    response = web.StreamResponse(
        status=101,
        headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": protocol},
    )
    response.force_close()
    upgraded = UpgradedInput()
    request.protocol.set_parser(upgraded)
    writer = await response.prepare(request)
    assert writer is not None

    async def read() -> bytes:
        return await upgraded.reader.read(64 * 1024)

    return response, spdy.Session(read, writer.write)


def _websocket_bytes(websocket: web.WebSocketResponse) -> Reader:
    """Reads a byte stream carried in binary messages; b"" once the WebSocket closes."""

    async def read() -> bytes:
        while True:
            message = await websocket.receive()
            if message.type is not WSMsgType.BINARY:
                return b""
            if message.data:
                return message.data

    return read


def _error_response(error: errors.ApiError) -> web.Response:
    # Returned rather than raised: a refused upgrade also carries headers.
    return web.json_response(error.status(), status=error.code)
