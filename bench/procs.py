"""Memory (RSS, PSS) and CPU time of the stack's process groups, with psutil."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

GONE = (psutil.NoSuchProcess, psutil.ZombieProcess)
# (monotonic time, CPU seconds per group, the machine's psutil.cpu_times())
Sample = tuple[float, dict[str, float], Any]


def _processes(root: int) -> list[psutil.Process]:
    """root and all its descendants that are alive now."""
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except GONE:
        return []


def tree(root: int) -> list[int]:
    return [process.pid for process in _processes(root)]


def memory_snapshot(groups: dict[str, int]) -> dict[str, object]:
    """Per group (name -> root pid): every process's RSS and PSS and the totals, in KiB.
    PSS shares copy-on-write pages fairly between a parent and its forked children, so
    a group's PSS sum is its real footprint."""
    snapshot: dict[str, object] = {}
    for name, root in groups.items():
        processes = []
        for process in _processes(root):
            try:
                info, cmd = process.memory_full_info(), " ".join(process.cmdline())[:120]
            except GONE:
                continue
            processes.append({
                "pid": process.pid, "role": "main" if process.pid == root else "child",
                "rss_kib": info.rss // 1024, "pss_kib": getattr(info, "pss", info.rss) // 1024,
                "cmd": cmd,
            })  # fmt: skip
        snapshot[name] = {
            "rss_kib": sum(p["rss_kib"] for p in processes),
            "pss_kib": sum(p["pss_kib"] for p in processes),
            "processes": processes,
        }
    return snapshot


def _cpu_seconds(process: psutil.Process, root: int) -> float:
    try:
        times = process.cpu_times()
    except GONE:
        return 0.0
    # A root's reaped children (postgres backends, pgbench) count too.
    reaped = times.children_user + times.children_system if process.pid == root else 0.0
    return times.user + times.system + reaped


class CpuMeter:
    """CPU seconds used by each group of processes between two samples, and by the rest
    of the machine (other engineers' test runs share it)."""

    def __init__(self) -> None:
        self.groups: dict[str, int] = {}  # name -> root pid

    def sample(self) -> Sample:
        used = {
            name: sum(_cpu_seconds(p, root) for p in _processes(root))
            for name, root in self.groups.items()
        }
        own = os.times()
        used["bench"] = own.user + own.system + own.children_user + own.children_system
        return time.monotonic(), used, psutil.cpu_times()

    @staticmethod
    def between(start: Sample, end: Sample) -> dict[str, float]:
        (t0, groups0, cpu0), (t1, groups1, cpu1) = start, end
        used = {name: round(groups1[name] - groups0.get(name, 0.0), 2) for name in groups1}

        def machine(*fields: str) -> float:
            return sum(getattr(cpu1, f, 0.0) - getattr(cpu0, f, 0.0) for f in fields)

        # Processes that are not the bench's: other engineers' test runs.
        other = machine("user", "nice", "system") - sum(used.values())
        used["other"] = round(max(other, 0.0), 2)
        # Kernel time in interrupts (loopback networking), and time the hypervisor gave
        # to other virtual machines.
        used["irq"] = round(machine("irq", "softirq"), 2)
        used["steal"] = round(machine("steal"), 2)
        used["idle"] = round(machine("idle", "iowait"), 2)
        used["wall_s"] = round(max(t1 - t0, 1e-9), 2)
        return used
