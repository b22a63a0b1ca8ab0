"""Medians over repetitions, fastproxy's ratios against its peers, and the Markdown, JSON and PNG outputs."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

HEADLINE_PEERS = ("kubectl-proxy", "nginx", "haproxy", "direct")
NOISY_FOREIGN_CPU = 0.10  # other tenants used more than a tenth of a core during the window
NOISY_STEAL = 0.05
LOAD_BOUND_LOAD_CPU = 0.95  # the load core was saturated while the proxy's core was not
LOAD_BOUND_PROXY_CPU = 0.90
PAIRED_FAMILIES = ("get", "management")  # measured in paired rounds unless --in-turn
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    throughput: bool = False  # limited by the load side when that saturates first


METRICS = {
    "get": [
        Metric("requests_per_s", "req/s", True, throughput=True),
        Metric("latency_p50_ms", "p50 ms", False),
        Metric("latency_p99_ms", "p99 ms", False),
        Metric("requests_per_cpu_s", "req per proxy CPU-s", True),
    ],
    "list": [
        Metric("mb_per_s", "MB/s", True, throughput=True),
        Metric("cpu_s_per_gb", "proxy CPU-s per GB", False),
    ],
    "watch": [
        Metric("events_per_s", "events/s delivered", True, throughput=True),
        Metric("latency_p50_ms", "p50 delivery ms", False),
        Metric("latency_p99_ms", "p99 delivery ms", False),
        Metric("cpu_us_per_event", "proxy CPU µs per event", False),
        Metric("kib_per_watch", "proxy KiB per watch", False),
        Metric("setup_s", "s to open all watches", False),
    ],
    "same": [
        Metric("upstream_streams", "upstream watch streams opened", False),
        Metric("events_per_s", "events/s delivered", True, throughput=True),
        Metric("latency_p99_ms", "p99 delivery ms", False),
        Metric("cpu_us_per_event", "proxy CPU µs per event", False),
        Metric("kib_per_watch", "proxy KiB per watch", False),
        Metric("setup_s", "s to open all watches", False),
    ],
}
METRICS["management"] = METRICS["get"]  # the gateway's own API, counted in requests like the small GET
WORKLOAD_TITLES = {"get": "small GET", "list": "chunked LIST", "watch": "watch fan-out", "management": "management API",
                   "same": "watch-same"}
MANAGEMENT_TITLES = {"get": "GET a user", "self": "create a Self", "list": "LIST 10,000 users"}


def family(case: str) -> str:
    return case.split("-")[0].split("+")[0]


def case_title(case: str) -> str:
    name = WORKLOAD_TITLES[family(case)]
    if family(case) == "watch":
        name += f" ×{int(case.split('-')[1].split('+')[0]):,}"
    elif family(case) == "same":  # same-CLIENTSxRESOURCES
        clients, resources = map(int, case.split("-")[1].split("+")[0].split("x"))
        name += f" ×{clients:,}" + (f" ({resources} resources of {clients // resources})" if resources > 1 else "")
    elif family(case) == "management":
        name += ": " + MANAGEMENT_TITLES[case.split("-")[1].split("+")[0]]
    return name + (" (TLS)" if case.endswith("+tls") else "")


def is_noisy(window: dict) -> bool:
    return window["foreign_cpu_util"] > NOISY_FOREIGN_CPU or window["steal_util"] > NOISY_STEAL


def is_load_bound(window: dict) -> bool:
    return window["load_cpu_util"] >= LOAD_BOUND_LOAD_CPU and window["proxy_cpu_util"] < LOAD_BOUND_PROXY_CPU


def summarize(cells: list[dict]) -> dict:
    """{case: {target: {"medians": {metric: value}, "runs", "noisy_runs", "load_bound_runs", "errors"}}}"""
    summary: dict = {}
    for cell in cells:
        entry = summary.setdefault(cell["case"], {}).setdefault(
            cell["target"], {"runs": [], "errors": []}
        )
        if "error" in cell:
            entry["errors"].append(cell["error"])
        else:
            entry["runs"].append(cell["metrics"])
    for case, by_target in summary.items():
        for entry in by_target.values():
            runs = entry.pop("runs")
            entry["medians"] = {
                metric.key: statistics.median(values)
                for metric in METRICS[family(case)]
                if (values := [run[metric.key] for run in runs if run.get(metric.key) is not None])
            }
            entry["runs"] = len(runs)
            entry["noisy_runs"] = sum(is_noisy(run["window"]) for run in runs)
            entry["load_bound_runs"] = sum(is_load_bound(run["window"]) for run in runs)
    return summary


def median_interval(values: list[float]) -> tuple[float, float] | None:
    """A distribution-free CONFIDENCE interval of the median: the order statistics x(k) and x(n+1-k)
    with the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at least CONFIDENCE; None
    when even the extremes fall short (fewer than 6 values)."""
    ordered, interval, below = sorted(values), None, 0.0
    for k in range(1, len(ordered) // 2 + 1):
        below += math.comb(len(ordered), k - 1) / 2 ** len(ordered)
        if 1 - 2 * below < CONFIDENCE:
            break
        interval = (ordered[k - 1], ordered[-k])
    return interval


def paired(cells: list[dict], targets: list[str]) -> dict:
    """The paired rounds' ratios, reference / peer per round, the reference being the first fastproxy target:
    {case: {"reference", "rounds", "ratios": {metric: {peer: {"per_round", "median", "interval", "noisy_rounds"}}},
    "windows": {foreign and idle-target CPU, steal}}}."""
    rounds: dict = {}
    for cell in cells:
        if cell.get("round") is not None and "metrics" in cell:
            rounds.setdefault(cell["case"], {}).setdefault(cell["round"], {})[cell["target"]] = cell["metrics"]
    result = {}
    for case, by_round in rounds.items():
        present = {target for measured in by_round.values() for target in measured}
        reference = next((target for target in targets if target in present and target.startswith("fastproxy")), None)
        if reference is None:
            continue
        ratios: dict = {}
        for metric in METRICS[family(case)]:
            for peer in (target for target in targets if target in present and target != reference):
                per_round, noisy = [], 0
                for measured in by_round.values():
                    ours, theirs = (measured.get(name, {}).get(metric.key) for name in (reference, peer))
                    if ours and theirs:
                        per_round.append(ours / theirs)
                        noisy += is_noisy(measured[reference]["window"]) or is_noisy(measured[peer]["window"])
                if per_round:
                    ratios.setdefault(metric.key, {})[peer] = {
                        "per_round": per_round, "median": statistics.median(per_round),
                        "interval": median_interval(per_round), "noisy_rounds": noisy}
        if not ratios:  # the reference alone (the management cases without a baseline)
            continue
        windows = [measured["window"] for by_target in by_round.values() for measured in by_target.values()]
        result[case] = {
            "reference": reference,
            "rounds": len(by_round),
            "ratios": ratios,
            "windows": {
                "foreign_cpu_util_median": statistics.median(window["foreign_cpu_util"] for window in windows),
                "foreign_cpu_util_max": max(window["foreign_cpu_util"] for window in windows),
                "steal_util_max": max(window["steal_util"] for window in windows),
                "foreign_proxy_core_util_median": statistics.median(window["foreign_proxy_core_util"] for window in windows),
                "foreign_proxy_core_util_max": max(window["foreign_proxy_core_util"] for window in windows),
                "idle_targets_cpu_util_median": statistics.median(
                    window.get("idle_targets_cpu_util", 0.0) for window in windows),
            },
        }
    return result


def ratio(summary: dict, case: str, metric: str, peer: str, rounds: dict | None = None) -> float | None:
    """fastproxy / peer: the median of the paired rounds' ratios where fastproxy was their reference,
    else the ratio of the medians."""
    paired_case = (rounds or {}).get(case)
    if paired_case and paired_case["reference"] == "fastproxy":
        return paired_case["ratios"].get(metric, {}).get(peer, {}).get("median")
    ours = summary[case].get("fastproxy", {}).get("medians", {}).get(metric)
    theirs = summary[case].get(peer, {}).get("medians", {}).get(metric)
    return ours / theirs if ours and theirs else None


def format_value(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def markdown(run: dict, summary: dict) -> str:
    targets = run["targets"]
    peers = [peer for peer in targets if peer != "fastproxy"]
    header = ["workload", "metric", "better", *targets, *(f"fastproxy / {peer}" for peer in peers)]
    rows = []
    for case, by_target in summary.items():
        for metric in METRICS[family(case)]:
            values = []
            for target in targets:
                entry = by_target.get(target)
                if not entry:
                    values.append("unavailable" if target in run["unavailable"] else "n/a")
                    continue
                value = entry["medians"].get(metric.key)
                text = format_value(value) if entry["runs"] else "error"
                if value is not None:
                    text += "*" if entry["noisy_runs"] else ""
                    text += "‡" if metric.throughput and entry["load_bound_runs"] else ""
                values.append(text)
            ratios = [ratio(summary, case, metric.key, peer, run.get("paired")) for peer in peers]
            rows.append([case_title(case), metric.label, "↑" if metric.higher_is_better else "↓", *values,
                         *(f"{value:.2f}×" if value else "–" for value in ratios)])

    lines = [
        f"# fastproxy benchmark, {run['started_utc']}",
        "",
        f"`{run['command']}`: " + (
            f"the small GET and management cases in {run['rounds']} paired rounds (all targets started at once, "
            f"{run['plan']['round_s']:g} s windows in alternating order; medians of the per-round values, and of "
            "the per-round ratios, intervals below); the rest in " if run.get("rounds") else "")
        + f"{run['repeat']} repetition(s), medians shown, each target started fresh per "
        "measurement, targets interleaved. Proxy pinned to CPU 0; upstream (nginx + stream server) and "
        f"load generators on CPU 1. The LIST answer is {run['list_mb']:g} MB; watches share "
        f"{run['watch_events_per_second_offered']:,.0f} events/s. "
        f"Headline ratios: fastproxy / {', fastproxy / '.join(HEADLINE_PEERS)} "
        "(read them with the ↑/↓ column: ↑ wants a ratio above 1, ↓ one below 1).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"`*` at least one repetition or round was noisy (other processes used over {NOISY_FOREIGN_CPU:.0%} of a core, or "
        f"steal over {NOISY_STEAL:.0%}). `‡` the load CPU saturated before the proxy's core: that throughput "
        "is a floor, and the per-CPU-second figure is the fair comparison. `–` not measured or not meaningful "
        "(direct has no proxy process). `n/a` the target does not support this case (kubectl proxy serves plain "
        "HTTP only).",
    ]
    windows = [cell["metrics"]["window"] for cell in run["cells"] if "metrics" in cell]
    if windows:
        foreign = sorted(window["foreign_cpu_util"] for window in windows)
        on_proxy_core = sorted(window["foreign_proxy_core_util"] for window in windows)
        lines += ["", f"Other processes on the machine used a median {statistics.median(foreign):.0%} of a core "
                      f"(at most {foreign[-1]:.0%}) during the measured windows; on the proxy's core, a median "
                      f"{statistics.median(on_proxy_core):.0%} (at most {on_proxy_core[-1]:.0%})."]
    lines += paired_section(run)
    notes = [f"- **{target} unavailable**: {reason.splitlines()[0]}" for target, reason in run["unavailable"].items()]
    for case, by_target in summary.items():
        for target, entry in by_target.items():
            notes += [f"- {case_title(case)} / {target}: {error.splitlines()[0]}" for error in entry["errors"]]
    if run["watch_streams_capped"]:
        notes.append(f"- watch streams capped at {run['watch_streams_capped']:,}: the open-file limit is "
                     f"{run['max_open_files']:,} and a proxy, like the upstream nginx, holds two sockets per watch")
    if notes:
        lines += ["", "## Problems", "", *notes]
    environment = run["environment"]
    lines += ["", "## Environment", "", *(f"- {name}: {value}" for name, value in environment.items()), ""]
    return "\n".join(lines)


def paired_section(run: dict) -> list[str]:
    """Per paired case: each ratio's median over the rounds, its 95% interval and the rounds themselves."""
    lines = []
    for case, result in run.get("paired", {}).items():
        windows = result["windows"]
        lines += [
            "", f"## Paired rounds: {case_title(case)}", "",
            f"{result['rounds']} rounds; ratios {result['reference']} / peer, per round. Over the windows other "
            f"processes used a median {windows['foreign_cpu_util_median']:.0%} of a core (at most "
            f"{windows['foreign_cpu_util_max']:.0%}), on the proxy's core a median "
            f"{windows['foreign_proxy_core_util_median']:.0%} (at most {windows['foreign_proxy_core_util_max']:.0%}), "
            f"steal at most {windows['steal_util_max']:.0%}, and the idle "
            f"targets a median {windows['idle_targets_cpu_util_median']:.1%} of the proxy core.",
            "",
            "| metric | better | ratio | median | 95% interval | noisy rounds | per round |",
            "|---|---|---|---|---|---|---|",
        ]
        for metric in METRICS[family(case)]:
            for peer, entry in result["ratios"].get(metric.key, {}).items():
                interval = entry["interval"]
                lines.append(
                    f"| {metric.label} | {'↑' if metric.higher_is_better else '↓'} | {result['reference']} / {peer} | "
                    f"{entry['median']:.2f}× | "
                    + (f"{interval[0]:.2f}–{interval[1]:.2f}×" if interval else "– (under 6 rounds)")
                    + f" | {entry['noisy_rounds']}/{len(entry['per_round'])} | "
                    + " ".join(f"{value:.2f}" for value in entry["per_round"]) + " |")
    return lines


def chart(run: dict, summary: dict, path: Path) -> None:
    """One panel per peer: fastproxy's advantage on every metric, oriented so that right of 1 is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    peers = [peer for peer in run["targets"] if peer != "fastproxy"]
    rows = [(case, metric) for case in summary for metric in METRICS[family(case)]]
    advantages = {
        peer: [
            (value if metric.higher_is_better else 1 / value) if (value := ratio(summary, case, metric.key, peer, run.get("paired")))
            else None
            for case, metric in rows
        ]
        for peer in peers
    }
    measured = [value for values in advantages.values() for value in values if value]
    widest = max([2.0, *(max(value, 1 / value) for value in measured)]) * 2.5  # room for the labels
    powers = [power for power in range(-8, 9) if 1 / widest <= 2.0**power <= widest]
    stride = -(-len(powers) // 7)  # at most about seven labelled ticks
    ticks = [2.0**power for power in powers if power % stride == 0]

    figure, axes = plt.subplots(1, len(peers), figsize=(3.2 * len(peers) + 3.5, 0.3 * len(rows) + 1.6),
                                sharey=True, squeeze=False)
    positions = list(range(len(rows)))
    for axis, peer in zip(axes[0], peers, strict=True):
        values = advantages[peer]
        for position, value in zip(positions, values, strict=True):
            if value is None:
                continue
            axis.barh(position, value - 1, left=1, color="tab:green" if value >= 1 else "tab:red")
            axis.annotate(f"{value:.2f}×", (value, position), xytext=(3 if value >= 1 else -3, 0),
                          textcoords="offset points", va="center", ha="left" if value >= 1 else "right",
                          fontsize=7)
        axis.axvline(1, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlim(1 / widest, widest)
        axis.xaxis.set_major_locator(FixedLocator(ticks))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels([f"{tick:g}×" if tick >= 1 else f"1/{1 / tick:g}×" for tick in ticks], fontsize=7)
        axis.set_title(f"vs {peer}")
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, [f"{case_title(case)}: {metric.label}" for case, metric in rows], fontsize=8)
    axes[0][0].invert_yaxis()  # shared: once for all panels
    figure.suptitle(f"fastproxy advantage (right of 1× = fastproxy better; latency, CPU and memory inverted), "
                    f"{run['started_utc']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
