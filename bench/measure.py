"""CPU and memory readings from /proc, taken around each measured window."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may contain spaces and parentheses: split after its closing one.
        return stat.read().rsplit(")", 1)[1].split()


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    tree, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root_pid: int) -> float:
    """User + system CPU of a process tree, including its reaped children (nginx workers, curl runs)."""
    ticks = 0
    for pid in process_tree(root_pid):
        try:
            utime, stime, cutime, cstime = (int(value) for value in _stat_fields(pid)[11:15])
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += utime + stime + cutime + cstime
    return ticks / CLOCK_TICKS_PER_SECOND


def rss_bytes(root_pid: int) -> int:
    total = 0
    for pid in process_tree(root_pid):
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * PAGE_BYTES
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_busy_seconds() -> dict[str, float]:
    """Busy and steal seconds since boot, for the whole machine ("cpu") and per CPU ("cpu0", ...)."""
    busy = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if not line.startswith("cpu"):
                break
            name, user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = line.split()
            busy[name] = (int(user) + int(nice) + int(system) + int(irq) + int(softirq)) / CLOCK_TICKS_PER_SECOND
            busy[f"{name}_steal"] = int(steal) / CLOCK_TICKS_PER_SECOND
    return busy


@dataclass
class Reading:
    at: float
    proxy_cpu_s: float
    ours_cpu_s: float
    machine: dict[str, float]


class Window:
    """CPU used over one measured window: by the proxy, by everything this run started, and by others.

    Everything of ours (proxy, upstream, load generators) descends from this harness process, so
    machine-wide busy time minus our tree's CPU is what other tenants of the machine used.
    """

    def __init__(self, proxy_pid: int | None, load_cpu: int, proxy_core: int) -> None:
        self.proxy_pid = proxy_pid
        self.load_cpu = load_cpu
        self.proxy_core = proxy_core

    def read(self) -> Reading:
        return Reading(
            at=time.monotonic(),
            proxy_cpu_s=cpu_seconds(self.proxy_pid) if self.proxy_pid else 0.0,
            ours_cpu_s=cpu_seconds(os.getpid()),
            machine=cpu_busy_seconds(),
        )

    def __enter__(self) -> Window:
        self.start = self.read()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end = self.read()

    def summary(self) -> dict[str, float]:
        start, end = self.start, self.end
        elapsed = end.at - start.at
        foreign = (end.machine["cpu"] - start.machine["cpu"]) - (end.ours_cpu_s - start.ours_cpu_s)
        load_cpu, proxy_core = f"cpu{self.load_cpu}", f"cpu{self.proxy_core}"
        proxy_cpu_s = end.proxy_cpu_s - start.proxy_cpu_s
        return {
            "elapsed_s": elapsed,
            "proxy_cpu_s": proxy_cpu_s,
            "proxy_cpu_util": proxy_cpu_s / elapsed,
            "load_cpu_util": (end.machine[load_cpu] - start.machine[load_cpu]) / elapsed,
            "foreign_cpu_util": max(0.0, foreign) / elapsed,
            "steal_util": (end.machine["cpu_steal"] - start.machine["cpu_steal"]) / elapsed,
            # Busy time of the proxy's core that was not the proxy's: other tenants there (or, in paired
            # rounds, the idle targets, which the harness subtracts), and interrupt work the kernel
            # does not charge to the proxy.
            "foreign_proxy_core_util": max(0.0, (end.machine[proxy_core] - start.machine[proxy_core]) - proxy_cpu_s)
            / elapsed,
        }
