"""Process trees from /proc: memory (RSS, PSS) and CPU time per group of processes.

Linux only, like the rest of the benchmark; no dependency beyond the standard library.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """root and all its descendants that are alive now."""
    children = children if children is not None else children_map()
    if _stat_fields(root) is None:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS shares copy-on-write pages fairly between a parent and
    its forked children, so a group's PSS sum is its real footprint."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        fields = _stat_fields(pid)
        if fields is not None:
            rss = pss = int(fields[21]) * PAGE_KIB
    return rss, pss


def memory_snapshot(groups: dict[str, int]) -> dict[str, object]:
    """Per group (name -> root pid): every process's RSS/PSS and the totals, in KiB."""
    children = children_map()
    snapshot: dict[str, object] = {}
    for name, root in groups.items():
        processes = []
        for pid in tree(root, children):
            rss, pss = memory_kib(pid)
            processes.append(
                {
                    "pid": pid,
                    "role": "main" if pid == root else "child",
                    "rss_kib": rss,
                    "pss_kib": pss,
                    "cmd": _cmdline(pid)[:120],
                }
            )
        snapshot[name] = {
            "rss_kib": sum(p["rss_kib"] for p in processes),
            "pss_kib": sum(p["pss_kib"] for p in processes),
            "processes": processes,
        }
    return snapshot


def _cpu_ticks(pid: int, include_reaped: bool) -> int:
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    # utime, stime, cutime, cstime are fields 14-17 of stat (11-14 after the name).
    ticks = int(fields[11]) + int(fields[12])
    if include_reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def _machine_ticks() -> dict[str, int]:
    """Jiffies of all CPUs since boot: processes, kernel interrupts, steal, idle."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return {
        "processes": user + nice + system,
        "irq": irq + softirq,
        "steal": steal,
        "idle": idle + iowait,
    }


def _all_processes() -> dict[int, tuple[str, int]]:
    """pid -> (command name, utime + stime ticks) of every process on the machine."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        found[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return found


@dataclass
class CpuSample:
    at: float
    groups: dict[str, float]
    machine: dict[str, float]
    ours: set[int]
    everyone: dict[int, tuple[str, int]]


class CpuMeter:
    """CPU seconds used by each group of processes between two samples, and by the rest
    of the machine (other engineers' test runs share it)."""

    def __init__(self) -> None:
        self.groups: dict[str, int] = {}

    def sample(self) -> CpuSample:
        children = children_map()
        groups: dict[str, float] = {}
        ours = set(tree(os.getpid(), children))
        for name, root in self.groups.items():
            ticks = 0
            members = tree(root, children)
            ours.update(members)
            for pid in members:
                # A root's reaped children (postgres backends, wrk, pgbench) count too.
                ticks += _cpu_ticks(pid, include_reaped=pid == root)
            groups[name] = ticks / CLOCK_TICKS
        own = os.times()
        groups["bench"] = own.user + own.system + own.children_user + own.children_system
        machine = {name: ticks / CLOCK_TICKS for name, ticks in _machine_ticks().items()}
        return CpuSample(time.monotonic(), groups, machine, ours, _all_processes())

    @staticmethod
    def between(start: CpuSample, end: CpuSample) -> dict[str, float]:
        wall = max(end.at - start.at, 1e-9)
        used = {
            name: round(end.groups.get(name, 0.0) - start.groups.get(name, 0.0), 2)
            for name in end.groups
        }
        machine = {name: end.machine[name] - start.machine[name] for name in end.machine}
        # Processes that are not the bench's: other engineers' test runs.
        used["other"] = round(max(machine["processes"] - sum(used.values()), 0.0), 2)
        # Kernel time in interrupts (loopback networking), and time the hypervisor
        # gave to other virtual machines.
        used["irq"] = round(machine["irq"], 2)
        used["steal"] = round(machine["steal"], 2)
        used["idle"] = round(machine["idle"], 2)
        used["wall_s"] = round(wall, 2)
        return used

    @staticmethod
    def others(start: CpuSample, end: CpuSample, top: int = 5) -> list[list[object]]:
        """The processes that are not the bench's and used the most CPU in between
        (those that started and ended in between are not seen)."""
        ours = start.ours | end.ours
        used: dict[str, float] = {}
        for pid, (name, ticks) in end.everyone.items():
            if pid in ours or pid not in start.everyone:
                continue
            spent = (ticks - start.everyone[pid][1]) / CLOCK_TICKS
            if spent > 0:
                used[name] = used.get(name, 0.0) + spent
        ranked = sorted(used.items(), key=lambda item: -item[1])[:top]
        return [[name, round(seconds, 2)] for name, seconds in ranked]
