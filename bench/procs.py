"""Memory (RSS, PSS, USS, private heap) and CPU time of the stack's process groups, with psutil."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

GONE = (psutil.NoSuchProcess, psutil.ZombieProcess)


def _processes(root: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except GONE:
        return []


def _anon_pss_kib(pid: int) -> int | None:
    """The kernel's Pss_Anon (Linux 5.13+): the process's heap, stacks and copy-on-write
    pages, shared fairly with its prefork parent; no shared memory, no mapped files."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_snapshot(groups: dict[str, int]) -> dict[str, Any]:
    """Per group (name -> root pid), per process and summed, in KiB: RSS; PSS, which
    shares copy-on-write pages fairly between a prefork parent and its children; USS, the
    pages mapped by one process alone (which, for PostgreSQL, counts the shared buffers
    only one process has touched: the checkpointer's grow as it writes the cache); and
    the private heap, Pss_Anon (USS where the kernel has no smaps_rollup)."""
    snapshot: dict[str, Any] = {}
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
                "uss_kib": getattr(info, "uss", info.rss) // 1024, "cmd": cmd,
            })  # fmt: skip
            anon = _anon_pss_kib(process.pid)
            processes[-1]["anon_kib"] = processes[-1]["uss_kib"] if anon is None else anon
        snapshot[name] = {
            "rss_kib": sum(p["rss_kib"] for p in processes),
            "pss_kib": sum(p["pss_kib"] for p in processes),
            "uss_kib": sum(p["uss_kib"] for p in processes),
            "anon_kib": sum(p["anon_kib"] for p in processes),
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
    """CPU seconds of each group between two samples, and of the rest of the machine."""

    def __init__(self) -> None:
        self.groups: dict[str, int] = {}  # name -> root pid

    def sample(self) -> tuple[float, dict[str, float], Any]:
        used = {
            name: sum(_cpu_seconds(p, root) for p in _processes(root))
            for name, root in self.groups.items()
        }
        own = os.times()
        used["bench"] = own.user + own.system + own.children_user + own.children_system
        return time.monotonic(), used, psutil.cpu_times()

    @staticmethod
    def between(start: tuple, end: tuple) -> dict[str, float]:
        (t0, groups0, cpu0), (t1, groups1, cpu1) = start, end
        used = {name: round(groups1[name] - groups0.get(name, 0.0), 2) for name in groups1}

        def machine(*fields: str) -> float:
            return round(sum(getattr(cpu1, f, 0.0) - getattr(cpu0, f, 0.0) for f in fields), 2)

        # other: others' processes; irq: mostly loopback networking; steal: the hypervisor's.
        used["other"] = max(round(machine("user", "nice", "system") - sum(used.values()), 2), 0.0)
        used |= {"irq": machine("irq", "softirq"), "steal": machine("steal")}
        used |= {"idle": machine("idle", "iowait"), "wall_s": round(max(t1 - t0, 1e-9), 2)}
        return used


def rss_kib(root: int) -> int:
    """RSS of `root` and its descendants, summed, in KiB (cheap: no PSS, any user's)."""
    total = 0
    for process in _processes(root):
        try:
            total += process.memory_info().rss
        except GONE:
            continue
    return total // 1024
