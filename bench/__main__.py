"""scripts/bench: one fast upstream, the targets in front of it in paired rounds or in turn.

The small GET and management cases start every target at once and measure them in alternating
rounds of short windows (bench/README.md, "Paired rounds"); the rest start each target fresh for
each measurement, in turn, interleaved over repetitions.

Writes bench/results/<UTC stamp>.{json,md} and <stamp>-ratios.png, and copies them to latest.*.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import report
from .measure import cpu_seconds
from .processes import LOAD_CPU, PROXY_CPU, Unavailable
from .targets import (
    MANAGEMENT_USERS,
    OPT_IN_TARGETS,
    TARGETS,
    Endpoint,
    Setup,
    Target,
    baseline_targets,
    build_go_proxy,
    make_state_file,
)
from .upstream import Upstream, make_tls_files
from .workloads import (
    FULL_PLAN,
    QUICK_PLAN,
    Plan,
    WorkloadFailed,
    chunked_list,
    management_get,
    management_list,
    management_self,
    small_get,
    watch_fanout,
    watch_same,
)

RESULTS = Path(__file__).resolve().parent / "results"
FDS_PER_WATCH = 2  # a proxy holds the client's socket and the upstream's; the upstream nginx holds two as well
FDS_SPARE = 2_000  # nginx starts closing connections ("worker_connections are not enough") short of its limit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short windows, small N")
    parser.add_argument("--repeat", type=int, help="repetitions of the in-turn cases (default 3, or 1 with --quick)")
    parser.add_argument("--rounds", type=int, help="paired rounds of the small GET and management cases "
                                                   "(default 10 of 3 s windows, or 6 of 1 s with --quick)")
    parser.add_argument("--in-turn", action="store_true",
                        help="measure the small GET and management cases like the others, each target started "
                             "fresh per repetition, instead of in paired rounds")
    parser.add_argument("--workloads", default="get,list,watch,management",
                        help="comma list of get, list, watch, watch-same (many clients watching alike; not by "
                             "default), management (the gateway's own API: fastproxy only)")
    parser.add_argument("--tls", action="store_true", help="also measure every workload with TLS on the client side")
    parser.add_argument("--targets", default=",".join(target.name for target in TARGETS),
                        help="comma list of targets (default: all but the opt-in ones: "
                             + ", ".join(target.name for target in OPT_IN_TARGETS) + ", fastproxy with its observers set "
                             "otherwise, see bench/targets.py VARIANTS)")
    parser.add_argument("--baseline", metavar="REVISION",
                        help="also measure fastproxy as of this git revision (e.g. HEAD~1), and so each fastproxy "
                             "variant in --targets, interleaved with the rest")
    parser.add_argument("--list-mb", type=float, default=50, help="size of the chunked LIST answer")
    parser.add_argument("--watch-events-per-second", type=float, default=10_000,
                        help="total event rate the upstream offers, split over however many watches are open")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    # 6 rounds are the fewest whose ratios give a distribution-free 95% interval of their median
    args.rounds = args.rounds or (6 if args.quick else 10)
    args.workloads = args.workloads.split(",")
    names = args.targets.split(",")
    args.targets = [target for target in TARGETS + OPT_IN_TARGETS if target.name in names]
    unknown = set(args.workloads) - {"get", "list", "watch", "watch-same", "management"}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    unknown = set(names) - {target.name for target in args.targets}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raise_open_file_limit() -> int:
    """Soft limit up to the hard one, inherited by every process started from here."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def prepare(workdir: Path, args: argparse.Namespace, max_open_files: int) -> Setup:
    tls = make_tls_files(workdir)
    token_file = workdir / "upstream-token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    access_key = secrets.token_urlsafe(32)
    access_key_file = workdir / "access-key"
    access_key_file.write_text(access_key + "\n")
    go_binary, go_problem = None, ""
    if any(target.name == "go-proxy" for target in args.targets):
        say("building bench/goproxy ...")
        try:
            go_binary = build_go_proxy(workdir)
        except Unavailable as problem:
            go_problem = str(problem)
    say("starting the upstream ...")
    upstream = Upstream(workdir, tls, args.list_mb, args.watch_events_per_second, max_open_files)
    state_file = None
    if "management" in args.workloads:
        say(f"writing a state store of {MANAGEMENT_USERS:,} users ...")
        state_file = make_state_file(workdir)
    return Setup(workdir, tls, upstream, token_file, access_key, access_key_file, max_open_files, go_binary,
                 go_problem, state_file)


def workload_cases(args: argparse.Namespace, plan: Plan, max_streams: int) -> list[tuple[str, Callable]]:
    cases = []
    if "get" in args.workloads:
        cases.append(("get", small_get))
    if "list" in args.workloads:
        cases.append(("list", chunked_list))
    if "watch" in args.workloads:
        for streams in plan.watch_streams:
            streams = min(streams, max_streams)
            cases.append((f"watch-{streams}", functools.partial(watch_fanout, streams=streams)))
    if "watch-same" in args.workloads:
        for streams, resources in plan.watch_same:
            streams = min(streams, max_streams // resources * resources)
            cases.append((f"same-{streams}x{resources}", functools.partial(watch_same, streams=streams,
                                                                            resources=resources)))
    if "management" in args.workloads:
        cases += [("management-get", management_get), ("management-self", management_self),
                  ("management-list", management_list)]
    return cases


def one_line(metrics: dict) -> str:
    shown = {key: value for key, value in metrics.items() if key != "window" and value is not None}
    window = metrics["window"]
    shown |= {"proxy_cpu": window["proxy_cpu_util"], "load_cpu": window["load_cpu_util"],
              "foreign_cpu": window["foreign_cpu_util"], "foreign_on_proxy_core": window["foreign_proxy_core_util"]}
    return "  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in shown.items())


def takes_part(target: Target, case: str, client_tls: bool, unavailable: dict[str, str]) -> bool:
    if target.name in unavailable or (client_tls and not target.serves_tls):
        return False
    # only the gateway serves its own API
    return report.family(case) != "management" or target.name.startswith("fastproxy")


def start(target: Target, setup: Setup, case: str, client_tls: bool, unavailable: dict[str, str]) -> Endpoint | None:
    """The target started for a case, or None (and the reason in `unavailable`) when it cannot be."""
    try:
        # Only the management cases get the state store: the others measure the proxy
        # alone, and a baseline older than the store's schema can still run them.
        case_setup = setup if report.family(case) == "management" else dataclasses.replace(setup, state_file=None)
        return target.start(case_setup, client_tls)
    except Unavailable as problem:
        unavailable[target.name] = str(problem)
        say(f"\n*** target {target.name} unavailable, skipped for the rest of the run:\n{problem}\n")
        return None


def tls_variants(args: argparse.Namespace) -> tuple[bool, ...]:
    return (False, True) if args.tls else (False,)


def run_paired(setup: Setup, args: argparse.Namespace, plan: Plan, cases: list[tuple[str, Callable]],
               unavailable: dict[str, str]) -> list[dict]:
    """Every target of a case started at once, then measured in short windows one after another, in
    rounds whose order alternates (A B C, C B A, ...): each round compares the targets over the same
    few seconds of the machine's load, which moves by more than their differences between rounds."""
    cells = []
    warm_up = dataclasses.replace(plan, get_warmup_s=0, get_duration_s=plan.get_warmup_s)
    window = dataclasses.replace(plan, get_warmup_s=0, get_duration_s=plan.round_s)
    for case, measure in cases:
        for client_tls in tls_variants(args):
            case_name = case + ("+tls" if client_tls else "")
            endpoints: dict[str, Endpoint] = {}
            try:
                for target in args.targets:
                    if takes_part(target, case, client_tls, unavailable):
                        endpoint = start(target, setup, case, client_tls, unavailable)
                        if endpoint:
                            endpoints[target.name] = endpoint
                for name, endpoint in list(endpoints.items()):
                    try:
                        measure(endpoint, warm_up, setup)  # fills connection pools; not counted
                    except WorkloadFailed as problem:
                        cells.append({"round": None, "case": case_name, "target": name, "error": str(problem)})
                        say(f"    {case_name} {name}: warm-up failed: {problem}")
                        endpoints.pop(name).stop()
                for round_number in range(args.rounds):
                    order = list(endpoints) if round_number % 2 == 0 else list(reversed(endpoints))
                    for name in order:
                        say(f"[round {round_number + 1}/{args.rounds}] {case_name:<16} {name:<14} ...")
                        cells.append(paired_window(setup, window, measure, endpoints, name,
                                                   {"round": round_number, "case": case_name, "target": name}))
            finally:
                for endpoint in endpoints.values():
                    endpoint.stop()
    return cells


def paired_window(setup: Setup, plan: Plan, measure: Callable, endpoints: dict[str, Endpoint], name: str,
                  cell: dict) -> dict:
    """One target's window of a round, with the CPU the idle targets used on the proxy core meanwhile."""
    idle = [endpoint.process.pid for other, endpoint in endpoints.items() if other != name and endpoint.process]
    idle_before, started = sum(map(cpu_seconds, idle)), time.monotonic()
    try:
        metrics = measure(endpoints[name], plan, setup)
    except WorkloadFailed as problem:
        say(f"    failed: {problem}")
        return {**cell, "error": str(problem)}
    window = metrics["window"]
    window["idle_targets_cpu_util"] = (sum(map(cpu_seconds, idle)) - idle_before) / (time.monotonic() - started)
    window["foreign_proxy_core_util"] = max(0.0, window["foreign_proxy_core_util"] - window["idle_targets_cpu_util"])
    say("    " + one_line(metrics))
    return {**cell, "metrics": metrics, "noisy": report.is_noisy(metrics["window"])}


def run_matrix(setup: Setup, args: argparse.Namespace, plan: Plan, cases: list[tuple[str, Callable]],
               unavailable: dict[str, str]) -> list[dict]:
    cells = []
    for repetition in range(args.repeat):
        for case, measure in cases:
            for client_tls in tls_variants(args):
                case_name = case + ("+tls" if client_tls else "")
                for target in args.targets:
                    if not takes_part(target, case, client_tls, unavailable):
                        continue
                    say(f"[{repetition + 1}/{args.repeat}] {case_name:<16} {target.name:<14} ...")
                    endpoint = start(target, setup, case, client_tls, unavailable)
                    if not endpoint:
                        continue
                    cell = {"repetition": repetition, "case": case_name, "target": target.name}
                    try:
                        cell["metrics"] = measure(endpoint, plan, setup)
                        cell["noisy"] = report.is_noisy(cell["metrics"]["window"])
                        say("    " + one_line(cell["metrics"]))
                    except WorkloadFailed as problem:
                        cell["error"] = str(problem)
                        say(f"    failed: {problem}")
                    finally:
                        endpoint.stop()
                    cells.append(cell)
    return cells


def environment() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (run.stdout or run.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "unknown")
    return {
        "cpu": f"{cpu_model}, {os.cpu_count()} CPUs; proxy on CPU {PROXY_CPU}, upstream and load on CPU {LOAD_CPU}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fastproxy commit": first_line(["git", "-C", str(RESULTS.parent.parent), "rev-parse", "--short", "HEAD"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "kubectl": first_line(["kubectl", "version", "--client"]),
        "wrk": first_line(["wrk", "-v"]),
        "go": first_line([os.environ.get("BENCH_GO", "go"), "version"]),
    }


def write_results(run: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    summary = report.summarize(run["cells"])
    run["summary"] = summary
    run["paired"] = report.paired(run["cells"], run["targets"])
    stamp = run["stamp"]
    outputs = {
        "json": RESULTS / f"{stamp}.json",
        "md": RESULTS / f"{stamp}.md",
    }
    outputs["json"].write_text(json.dumps(run, indent=2) + "\n")
    outputs["md"].write_text(report.markdown(run, summary))
    peers = [target for target in run["targets"] if target != "fastproxy"]
    if peers and any(entry.get("fastproxy", {}).get("runs") for entry in summary.values()):
        outputs["ratios.png"] = RESULTS / f"{stamp}-ratios.png"
        report.chart(run, summary, outputs["ratios.png"])
    for suffix, path in outputs.items():
        shutil.copyfile(path, RESULTS / f"latest{'-' if suffix == 'ratios.png' else '.'}{suffix}")
    return outputs["md"]


def main() -> int:
    args = parse_args()
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    os.sched_setaffinity(0, {LOAD_CPU})  # keep the harness itself off the proxy's core
    max_open_files = raise_open_file_limit()
    max_streams = (max_open_files - FDS_SPARE) // FDS_PER_WATCH
    started = datetime.datetime.now(datetime.UTC)
    unavailable: dict[str, str] = {}
    cases = workload_cases(args, plan, max_streams)
    versions = environment()  # before the run: the checkout may move on while it lasts
    with tempfile.TemporaryDirectory(prefix="fastproxy-bench-") as workdir:
        setup = prepare(Path(workdir), args, max_open_files)
        if args.baseline:
            args.targets[1:1] = baseline_targets(args.baseline, Path(workdir), [target.name for target in args.targets])
        paired_cases = [] if args.in_turn else [(case, measure) for case, measure in cases
                                                if report.family(case) in report.PAIRED_FAMILIES]
        try:
            cells = run_paired(setup, args, plan, paired_cases, unavailable)
            cells += run_matrix(setup, args, plan, [case for case in cases if case not in paired_cases], unavailable)
        finally:
            setup.upstream.stop()
    run = {
        "stamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["scripts/bench", *sys.argv[1:]]),
        "repeat": args.repeat,
        "rounds": None if args.in_turn else args.rounds,
        "plan": dataclasses.asdict(plan),
        "targets": [target.name for target in args.targets],
        "list_mb": args.list_mb,
        "watch_events_per_second_offered": args.watch_events_per_second,
        "max_open_files": max_open_files,
        "watch_streams_capped": max_streams if max(plan.watch_streams) > max_streams
        and {"watch", "watch-same"} & set(args.workloads)
        else None,
        "unavailable": unavailable,
        "environment": versions,
        "cells": cells,
    }
    markdown_path = write_results(run)
    print(markdown_path.read_text())
    say(f"results: {markdown_path} (and .json, latest.md, latest.json)")
    for target, reason in unavailable.items():
        say(f"*** {target} was unavailable: {reason.splitlines()[0]}")
    return 1 if unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
