"""Instructions per small GET or per watch event, counted by callgrind: the cost of a change or an observer, exactly.

    python -m bench.instructions [--requests N] [--targets fastproxy-bare,fastproxy-metrics,...]
                                 [--baseline REVISION] [--path PATH]
    python -m bench.instructions --workload watch [--watches N] [--events E] [--syscalls] [--targets ...]
                                 [--baseline REVISION]

Time on a shared machine moves by several percent between runs; the instructions a process
executes for the same requests do not (callgrind counts them, whatever else the machine does),
so a 3% budget can be checked at all. Each target (`fastproxy` and the opt-in variants of
bench/targets.py, each also as of `--baseline REVISION`) runs one worker under `valgrind --tool=callgrind`
in front of the bench's nginx upstream (TLS to it, plain HTTP from the client, an access key and
impersonation, as in `scripts/bench`); after a warm-up the counters are zeroed, N keep-alive GETs
are made one after another, and the counters dumped: every thread of the gateway counted (the
audit and access log writers included), the once-a-second tick too. Under callgrind a request
takes ~50x longer, so the tick weighs ~50x more per request than it does at full speed: the
figures overstate, never understate, the tick's share.

`--workload watch`: N watch clients (TLS to the gateway, as in `scripts/bench --tls`) on the bench's
watch upstream, which broadcasts events to every watch at a total rate (1,000/s) the gateway keeps
up with even under callgrind (one event per read, as at full speed). Periodic work is counted at
callgrind's pace here too: a cluster health probe (every 15 s, a TLS connection) adds ~1.5% when
it falls in the counted stretch. The stream server is stopped
(SIGSTOP) until every watch is quiet, the counters zeroed, the server let go until each watch has
had E more events, stopped again, and once quiet the counters dumped: instructions per event
relayed to one client, over exactly the events the clients received. `--syscalls` counts the
system calls of the same procedure, without callgrind, by `strace -c -f` attached to the gateway.

Writes bench/results/<stamp>-instructions.md (and latest-instructions.md), or with `--workload watch`
<stamp>-watch-instructions.md (and latest-watch-instructions.md).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .__main__ import RESULTS, prepare, raise_open_file_limit
from .processes import PROXY_CPU, Process, free_port, wait_until_ready
from .targets import VARIANTS, Setup, baseline_source, fastproxy_argv, fastproxy_config
from .upstream import SMALL_PATH, WATCH_PATH
from .watch_client import Tally, open_streams

WARM_UP = 300
CALLGRIND_START = 240.0  # seconds a gateway may take to start under callgrind
# Events/s the upstream offers in all: a gateway under callgrind keeps up (one TLS read per event
# relayed at 100 watches, as at full speed), and periodic work (the 1 s tick, a cluster probe every
# 15 s) weighs less the shorter the counted stretch.
WATCH_RATE = 1000.0
WATCH_WARM_UP = 5        # events each watch gets before counting starts
QUIET_S = 1.0            # no event for this long: nothing is in flight


def count(setup: Setup, name: str, extra: str, source: Path | None, args: argparse.Namespace) -> tuple[int, int]:
    """(instructions, requests or events) the gateway executed for the workload after a warm-up."""
    port = free_port()
    out = setup.workdir / f"callgrind-{name}.out"
    watch = args.workload == "watch"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            *fastproxy_argv(fastproxy_config(setup, port, watch, extra, source))]
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    process = Process(name, argv, PROXY_CPU, setup.workdir, env=env)
    try:
        if watch:
            _ready(setup, process, port, True)
            done = _relay(setup, port, args, lambda: _control(process, "--zero"), lambda: _control(process, "--dump"))
        else:
            headers = {"Authorization": f"Bearer {setup.access_key}"}
            target = f"/kubernetes/cluster/bench{args.path}"
            wait_until_ready(process, f"http://127.0.0.1:{port}{target}", headers, timeout=CALLGRIND_START)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            _get(connection, target, headers, WARM_UP)
            _control(process, "--zero")
            _get(connection, target, headers, args.requests)
            _control(process, "--dump")
            connection.close()
            done = args.requests
    finally:
        process.stop()
    dumps = sorted(setup.workdir.glob(f"callgrind-{name}.out.*"))
    if not dumps:
        raise SystemExit(f"{name}: callgrind wrote no dump\n{process.log_tail()}")
    return _total(dumps[0]), done


def count_syscalls(setup: Setup, name: str, extra: str, source: Path | None, args: argparse.Namespace) -> tuple[int, int]:
    """(system calls, events) of the watch workload, by strace attached to the gateway (no callgrind)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    process = Process(name, fastproxy_argv(fastproxy_config(setup, port, True, extra, source)), PROXY_CPU,
                      setup.workdir, env=env)
    out = setup.workdir / f"strace-{name}.txt"
    tracer: list[subprocess.Popen[bytes]] = []

    def attach() -> None:
        tracer.append(subprocess.Popen(["strace", "-c", "-U", "name,calls", "-f", "-q", "-o", str(out), "-p", str(process.pid)]))
        time.sleep(1.0)  # attached to every thread; nothing flows meanwhile

    def detach() -> None:
        tracer[0].send_signal(signal.SIGINT)
        tracer[0].wait(timeout=60)

    try:
        _ready(setup, process, port, False)
        events = _relay(setup, port, args, attach, detach)
    finally:
        if tracer and tracer[0].poll() is None:
            tracer[0].kill()
        process.stop()
    calls = {call: int(number) for call, number in re.findall(r"^(\w+)\s+(\d+)$", out.read_text(), re.M)}
    if "total" not in calls:
        raise SystemExit(f"{name}: no strace summary in {out}:\n{out.read_text()[-2000:]}")
    print("    per event: " + ", ".join(f"{call} {number / events:.2f}" for call, number in calls.items()),
          file=sys.stderr, flush=True)
    return calls["total"], events


def _ready(setup: Setup, process: Process, port: int, callgrind: bool) -> None:
    wait_until_ready(process, f"https://127.0.0.1:{port}/kubernetes/cluster/bench{SMALL_PATH}",
                     {"Authorization": f"Bearer {setup.access_key}"}, setup.tls.ca,
                     timeout=CALLGRIND_START if callgrind else 20)


def _relay(setup: Setup, port: int, args: argparse.Namespace, begin: Callable[[], None],
           end: Callable[[], None]) -> int:
    """Open the watches, then count between `begin()` and `end()` while each watch gets args.events
    events; returns how many events the clients received in between (all of them, nothing in flight)."""
    upstream = setup.upstream.stream_server.pid
    client = argparse.Namespace(
        url=f"https://127.0.0.1:{port}/kubernetes/cluster/bench{WATCH_PATH}", streams=args.watches, resources=1,
        header=[f"Authorization: Bearer {setup.access_key}"], cafile=str(setup.tls.ca), connect_concurrency=20,
        timeout=CALLGRIND_START, setup_timeout=CALLGRIND_START * 2)

    async def events_after(target: int) -> None:
        while tally.events < target:
            await asyncio.sleep(0.05)

    async def quiet() -> int:
        seen = -1
        while seen != tally.events:
            seen = tally.events
            await asyncio.sleep(QUIET_S)
        return seen

    async def run() -> int:
        streams, failures = await open_streams(client, tally)
        try:
            if len(streams) != args.watches:
                raise SystemExit(f"only {len(streams)} of {args.watches} watches opened: {failures.most_common(3)}")
            await events_after(args.watches * WATCH_WARM_UP)
            os.kill(upstream, signal.SIGSTOP)
            first = await quiet()
            begin()  # blocks the loop: nothing arrives while the upstream is stopped
            os.kill(upstream, signal.SIGCONT)
            await events_after(first + args.watches * args.events)
            os.kill(upstream, signal.SIGSTOP)
            last = await quiet()
            end()
            return last - first
        finally:
            os.kill(upstream, signal.SIGCONT)
            for stream in streams:
                stream.transport.close()

    tally = Tally()
    tally.counting = True
    return asyncio.run(run())


def _get(connection: http.client.HTTPConnection, target: str, headers: dict[str, str], times: int) -> None:
    for _ in range(times):
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"GET {target}: HTTP {response.status}")


def _control(process: Process, action: str) -> None:
    done = subprocess.run(["callgrind_control", action, str(process.pid)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "OK" not in done.stdout:
        raise SystemExit(f"callgrind_control {action}: {done.stdout}{done.stderr}")


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"{dump}: no totals line")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("get", "watch"), default="get",
                        help="what is counted: small GETs (default) or watch events relayed over TLS")
    parser.add_argument("--requests", type=int, default=2000, help="GETs counted per target (default 2000)")
    parser.add_argument("--watches", type=int, default=100, help="watch clients (--workload watch; default 100)")
    parser.add_argument("--events", type=int, default=50,
                        help="events counted per watch client (--workload watch; default 50)")
    parser.add_argument("--syscalls", action="store_true",
                        help="with --workload watch: also count system calls per event (strace -c -f, no callgrind)")
    parser.add_argument("--targets", default="fastproxy-bare,fastproxy-metrics,fastproxy",
                        help=f"comma list of fastproxy, {', '.join(VARIANTS)} (default: the bare gateway, "
                             "metrics alone, the defaults); the first is the one the others are compared with")
    parser.add_argument("--baseline", metavar="REVISION",
                        help="also count each target as of this git revision (first, and compared with)")
    parser.add_argument("--path", default=SMALL_PATH, help=f"the cluster path asked for (default {SMALL_PATH})")
    args = parser.parse_args()
    names = args.targets.split(",")
    unknown = [name for name in names if name != "fastproxy" and name not in VARIANTS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    watch = args.workload == "watch"
    if args.syscalls and not watch:
        parser.error("--syscalls goes with --workload watch")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.syscalls and shutil.which("strace") is None:
        raise SystemExit("strace is not installed (Debian: apt-get install strace)")
    raise_open_file_limit()
    started = datetime.datetime.now(datetime.UTC)
    unit = "event" if watch else "request"
    what = f"{args.events} events to each of {args.watches} TLS watches" if watch else f"{args.requests} GETs"
    rows: list[tuple[str, float, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="fastproxy-instructions-") as workdir:
        setup = prepare(Path(workdir), argparse.Namespace(targets=[], list_mb=1, workloads=["get"],
                                                          watch_events_per_second=WATCH_RATE if watch else 100), 4096)
        try:
            # Each target as of the baseline first, then as it is here.
            source = baseline_source(args.baseline, Path(workdir)) if args.baseline else None
            runs: list[tuple[str, str, Path | None]] = [
                (f"{name}@{args.baseline}", VARIANTS.get(name, ""), source) for name in names] if source else []
            runs += [(name, VARIANTS.get(name, ""), None) for name in names]
            for name, extra, source in runs:
                print(f"{name}: counting {what} under callgrind ...", file=sys.stderr, flush=True)
                total, done = count(setup, name.replace("@", "-"), extra, source, args)
                calls = None
                if args.syscalls:
                    traced, events = count_syscalls(setup, name.replace("@", "-"), extra, source, args)
                    calls = traced / events
                rows.append((name, total / done, calls))
                print(f"    {total / done:,.0f} instructions per {unit}"
                      + (f", {calls:.2f} system calls" if calls is not None else ""), file=sys.stderr, flush=True)
        finally:
            setup.upstream.stop()
    first = rows[0][1]
    command = shlex.join(["python", "-m", "bench.instructions", *sys.argv[1:]])
    counted = {name: per for name, per, _ in rows}
    against = f" × {args.baseline} |" if args.baseline else ""
    syscalls = f" system calls / {unit} |" if args.syscalls else ""
    title = f"Instructions per watch event relayed over TLS, {args.watches} watches" if watch else \
        "Instructions per small GET"
    lines = [f"# {title} ({started:%Y-%m-%d %H:%M} UTC)", "", f"`{command}`", "",
             f"| target | instructions / {unit} | × {rows[0][0]} |{against}{syscalls}",
             "|---|---:|---:|" + ("---:|" if against else "") + ("---:|" if syscalls else "")]
    for name, per, calls in rows:
        before = counted.get(f"{name}@{args.baseline}")
        versus = (f" {per / before:.3f} |" if before else " |") if against else ""
        calls_cell = f" {calls:.2f} |" if calls is not None else ""
        lines.append(f"| {name} | {per:,.0f} | {per / first:.3f} |{versus}{calls_cell}")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    kind = "watch-instructions" if watch else "instructions"
    path = RESULTS / f"{started:%Y%m%dT%H%M%SZ}-{kind}.md"
    path.write_text(text)
    shutil.copyfile(path, RESULTS / f"latest-{kind}.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
