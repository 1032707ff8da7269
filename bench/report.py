"""The printed table and the PNG chart of a result (the JSON written by bench.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _target(ok: bool | None, text: str) -> str:
    if ok is None:
        return text
    return f"{text}  {'met' if ok else 'MISSED'}"


def _ms(section: dict[str, Any] | None, *keys: str) -> str:
    if not section:
        return "-"
    return " / ".join(_num(section.get(k), 1) for k in keys)


def table(results: dict[str, Any]) -> str:
    """One line per measured number, with the ratio or target the issue sets."""
    phases = results.get("phases", {})
    rows: list[tuple[str, str, str, str]] = []
    a = phases.get("a", {})
    rows.append(
        (
            "a",
            f"pgbench TPC-B-like tps (scale {a.get('scale', '-')}, "
            f"{a.get('clients', '-')} clients, {a.get('seconds', '-')} s)",
            _num(a.get("tps")),
            "reference",
        )
    )
    b = phases.get("b", {})
    ratio = b.get("ratio_to_pgbench")
    rows.append(
        (
            "b",
            f"settled/s, backlog of {_num(b.get('backlog'))} ({','.join(b.get('currencies', []))})",
            _num(b.get("settled_per_s")),
            _target(
                ratio >= 1.0 if ratio is not None else None,
                f"{_num(ratio, 2)} x a  (target >= 1.0)",
            ),
        )
    )
    audit = _get(b, "audit", "ok")
    rows.append(
        (
            "b",
            "ledger audit after the drain",
            "-" if audit is None else ("consistent" if audit else "VIOLATIONS"),
            "",
        )
    )
    c = phases.get("c", {})
    tool = c.get("tool", "-")
    rows.append(
        (
            "c",
            f"GET /currencies req/s (trivial; {c.get('clients', '-')} clients, {tool})",
            _num(_get(c, "trivial", "requests_per_s")),
            "reference of c",
        )
    )
    rows.append(
        (
            "c",
            "GET /health req/s (DB + Redis round trip)",
            _num(_get(c, "health", "requests_per_s")),
            "",
        )
    )
    ratio = c.get("ratio_post_to_trivial")
    rows.append(
        (
            "c",
            "POST transfer req/s (Basic Auth)",
            _num(_get(c, "post", "requests_per_s")),
            _target(
                ratio >= 0.5 if ratio is not None else None,
                f"{_num(ratio, 2)} x trivial  (target >= 0.5)",
            ),
        )
    )
    batch = c.get("batch") or {}
    items = results.get("config", {}).get("batch_items", "-")
    rows.append(
        (
            "c",
            f"POST batch transfers/s ({items} per request)",
            _num(batch.get("transfers_per_s")),
            f"{_num(c.get('ratio_batch_to_trivial'), 2)} x trivial",
        )
    )
    d = phases.get("d", {})
    e2e = d.get("submit_to_settled_ms") or {}
    p99 = e2e.get("p99")
    rows.append(
        (
            "d",
            f"submit -> settled p50/p95/p99 ms at {_num(d.get('rate_per_s'))}/s",
            _ms(e2e, "p50", "p95", "p99"),
            _target(p99 < 100 if p99 is not None else None, "p99 target < 100 ms"),
        )
    )
    e = phases.get("e", {})
    rows_in_table = _num(e.get("transfers_in_table"))
    for key, label in (("get_transfer", "GET transfer"), ("list_100", "GET list, 100 rows")):
        section = _get(e, key, "latency_ms")
        p99 = section.get("p99") if section else None
        rows.append(
            (
                "e",
                f"{label} p50/p99 ms ({rows_in_table} transfers)",
                _ms(section, "p50", "p99"),
                _target(p99 < 20 if p99 is not None else None, "p99 target < 20 ms"),
            )
        )
    f = phases.get("f", {})
    for group in ("web", "worker"):
        section = f.get(group) or {}
        rows.append(
            (
                "f",
                f"{group} RSS MiB start -> after {_num(f.get('settlements'))} settlements",
                f"{_num(section.get('rss_start_mib'), 1)} -> "
                f"{_num(section.get('rss_after_mib'), 1)}",
                f"{_num(section.get('rss_growth_pct'), 1)} % (since "
                f"{section.get('warm_snapshot', 'warm')}: "
                f"{_num(section.get('rss_growth_since_warm_pct'), 1)} %)",
            )
        )
    audit = _get(f, "final_audit", "ok")
    rows.append(
        (
            "f",
            "final ledger audit",
            "-" if audit is None else ("consistent" if audit else "VIOLATIONS"),
            "",
        )
    )

    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("", "measure", "value", "ratio / target")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    lines = [
        f"Remit bench — {results.get('mode')} run of {results.get('started_at')} "
        f"({_get(results, 'machine', 'cores')} cores, shared machine)",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]]
        lines.append("  ".join(cells).rstrip())
    errors = [f"phase {k}: {v['error']}" for k, v in phases.items() if "error" in v]
    if errors:
        lines.append("errors: " + "; ".join(errors))
    lines.append(_cpu_lines(phases, _get(results, "machine", "cores") or 2))
    return "\n".join(lines)


CPU_COLUMNS = ("web", "worker", "postgres", "redis", "bench", "other", "irq", "steal", "idle")


def _cpu_lines(phases: dict[str, Any], cores: int) -> str:
    out = [
        f"CPU seconds per phase ({cores} cores = {cores} s per wall second): "
        + " / ".join(CPU_COLUMNS).replace("bench", "bench+load generator")
    ]
    for key, section in phases.items():
        cpu = section.get("cpu_s") or {}
        line = f"  {key}: wall {_num(cpu.get('wall_s'), 1)} s — " + " / ".join(
            _num(cpu.get(column), 1) for column in CPU_COLUMNS
        )
        capacity = cores * (cpu.get("wall_s") or 0)
        if capacity and (cpu.get("other") or 0) > 0.1 * capacity:
            line += f"   <- {100 * cpu['other'] / capacity:.0f} % of the CPU went to others"
        out.append(line)
    return "\n".join(out)


def chart(results: dict[str, Any], path: Path) -> None:
    """Throughput, latency, the backlog drain and memory, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = results.get("phases", {})
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    figure.suptitle(
        f"Remit bench — {results.get('mode')} run {results.get('started_at')} "
        f"({_get(results, 'machine', 'cores')} cores, shared machine)"
    )
    _throughput(axes[0][0], phases)
    _latency(axes[0][1], phases)
    _drain(axes[1][0], phases)
    _memory(axes[1][1], results.get("memory", {}))
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _throughput(ax: Any, phases: dict[str, Any]) -> None:
    bars = [
        ("a pgbench tps", _get(phases, "a", "tps")),
        ("b settled/s", _get(phases, "b", "settled_per_s")),
        ("c GET /currencies", _get(phases, "c", "trivial", "requests_per_s")),
        ("c GET /health", _get(phases, "c", "health", "requests_per_s")),
        ("c POST transfer", _get(phases, "c", "post", "requests_per_s")),
        ("c batch transfers/s", _get(phases, "c", "batch", "transfers_per_s")),
    ]
    bars = [(label, value) for label, value in bars if value is not None]
    if bars:
        labels, values = zip(*bars, strict=True)
        colors = ["#777" if label.startswith("a ") else "#2a7" for label in labels]
        drawn = ax.barh(labels, values, color=colors)
        ax.bar_label(drawn, fmt="%.0f", padding=3)
        ax.invert_yaxis()
    ax.set_title("throughput (per second)")


def _latency(ax: Any, phases: dict[str, Any]) -> None:
    latencies = []
    for label, section in (
        ("d submit→settled", _get(phases, "d", "submit_to_settled_ms")),
        ("d submit (POST)", _get(phases, "d", "submit_response_ms")),
        ("e GET transfer", _get(phases, "e", "get_transfer", "latency_ms")),
        ("e GET list 100", _get(phases, "e", "list_100", "latency_ms")),
    ):
        if section and section.get("p50") is not None:
            latencies.append((label, section))
    width = 0.25
    for offset, key in enumerate(("p50", "p95", "p99")):
        xs = [i + (offset - 1) * width for i in range(len(latencies))]
        ys = [section.get(key) or 0 for _, section in latencies]
        ax.bar(xs, ys, width, label=key)
    ax.set_xticks(range(len(latencies)), [label for label, _ in latencies], fontsize=8)
    ax.set_yscale("log")
    ax.axhline(100, color="red", linestyle=":", linewidth=1)
    ax.axhline(20, color="orange", linestyle=":", linewidth=1)
    ax.set_ylabel("ms (log)")
    ax.set_title("latency (targets: d p99 < 100 ms, e p99 < 20 ms)")
    ax.legend()


def _drain(ax: Any, phases: dict[str, Any]) -> None:
    series = _get(phases, "b", "pending_over_time") or []
    if series:
        ax.plot([t for t, _ in series], [n for _, n in series], color="#2a7")
    ax.set_xlabel("seconds since the doorbell")
    ax.set_ylabel("pending transfers")
    ax.set_title("b: backlog drained by the worker pool")


def _memory(ax: Any, memory: dict[str, Any]) -> None:
    labels = [label for label in memory if isinstance(memory[label], dict)]
    for group, color in (("web", "#27a"), ("worker", "#a72")):
        for key, style, name in (("rss_kib", "-", "RSS (sum)"), ("pss_kib", "--", "PSS")):
            values = [(memory[label].get(group) or {}).get(key, 0) / 1024 for label in labels]
            ax.plot(
                labels, values, marker="o", linestyle=style, color=color, label=f"{group} {name}"
            )
    ax.set_ylabel("MiB")
    ax.set_title("f: memory of the stack over the run")
    ax.legend()
    ax.tick_params(axis="x", labelsize=8)
