"""Memory (RSS, PSS) and CPU time of the stack's process groups, with psutil."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

GONE = (psutil.NoSuchProcess, psutil.ZombieProcess)


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
                info = process.memory_full_info()
                cmd = " ".join(process.cmdline())[:120]
            except GONE:
                continue
            rss, pss = info.rss // 1024, getattr(info, "pss", info.rss) // 1024
            role = "main" if process.pid == root else "child"
            processes.append(
                {"pid": process.pid, "role": role, "rss_kib": rss, "pss_kib": pss, "cmd": cmd}
            )
        snapshot[name] = {
            "rss_kib": sum(p["rss_kib"] for p in processes),
            "pss_kib": sum(p["pss_kib"] for p in processes),
            "processes": processes,
        }
    return snapshot


def _cpu_seconds(process: psutil.Process, reaped: bool) -> float:
    try:
        times = process.cpu_times()
    except GONE:
        return 0.0
    seconds = times.user + times.system
    # A root's reaped children (postgres backends, pgbench) count too.
    return seconds + (times.children_user + times.children_system if reaped else 0.0)


@dataclass
class CpuSample:
    at: float
    groups: dict[str, float]
    machine: dict[str, float]


class CpuMeter:
    """CPU seconds used by each group of processes between two samples, and by the rest
    of the machine (other engineers' test runs share it)."""

    def __init__(self) -> None:
        self.groups: dict[str, int] = {}

    def sample(self) -> CpuSample:
        groups: dict[str, float] = {}
        for name, root in self.groups.items():
            members = _processes(root)
            groups[name] = sum(_cpu_seconds(p, reaped=p.pid == root) for p in members)
        own = os.times()
        groups["bench"] = own.user + own.system + own.children_user + own.children_system
        cpu = psutil.cpu_times()
        machine = {
            "processes": cpu.user + cpu.nice + cpu.system,
            "irq": cpu.irq + cpu.softirq,
            "steal": getattr(cpu, "steal", 0.0),
            "idle": cpu.idle + getattr(cpu, "iowait", 0.0),
        }
        return CpuSample(time.monotonic(), groups, machine)

    @staticmethod
    def between(start: CpuSample, end: CpuSample) -> dict[str, float]:
        used = {
            name: round(end.groups.get(name, 0.0) - start.groups.get(name, 0.0), 2)
            for name in end.groups
        }
        machine = {name: end.machine[name] - start.machine[name] for name in end.machine}
        # Processes that are not the bench's: other engineers' test runs.
        used["other"] = round(max(machine["processes"] - sum(used.values()), 0.0), 2)
        # Kernel time in interrupts (loopback networking), and time the hypervisor gave
        # to other virtual machines.
        for name in ("irq", "steal", "idle"):
            used[name] = round(machine[name], 2)
        used["wall_s"] = round(max(end.at - start.at, 1e-9), 2)
        return used
