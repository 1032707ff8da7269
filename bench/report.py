"""The printed table and the PNG chart of a result (the JSON written by bench.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CPU_COLUMNS = ("web", "worker", "webhooks", "postgres", "redis", "bench", "other", "irq", "steal",
               "idle")  # fmt: skip


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else str(value)


def _ms(section: dict[str, Any] | None, *keys: str) -> str:
    return " / ".join(_num((section or {}).get(k), 1) for k in keys) if section else "-"


def _target(value: float | None, ok: bool, text: str) -> str:
    return text if value is None else f"{text}  {'met' if ok else 'MISSED'}"


def _audit(ok: bool | None) -> str:
    return "-" if ok is None else "consistent" if ok else "VIOLATIONS"


def table(results: dict[str, Any]) -> str:
    """One line per measured number, with the ratio or target the issue sets."""
    phases = results.get("phases", {})
    a, b, c, d, e, f, cold_start, h, i = (phases.get(key, {}) for key in "abcdefghi")
    b_ratio, c_ratio = b.get("ratio_to_pgbench"), c.get("ratio_post_to_trivial")
    i_ratio = i.get("ratio_to_pgbench")
    e2e = d.get("submit_to_settled_ms") or {}
    rows = [
        ("a", f"pgbench TPC-B-like tps (scale {a.get('scale', '-')}, {a.get('clients', '-')} "
         f"clients, {a.get('seconds', '-')} s)", _num(a.get("tps")), "reference"),
        ("b", f"settled/s, backlog of {_num(b.get('backlog'))} "
         f"({','.join(b.get('currencies', []))})",
         _num(b.get("settled_per_s")),
         _target(b_ratio, (b_ratio or 0) >= 1.0, f"{_num(b_ratio, 2)} x a  (target >= 1.0)")),
        ("b", "ledger audit after the drain", _audit(_get(b, "audit", "ok")), ""),
        ("i", f"settled/s, mix of {_num(i.get('backlog'))} "
         f"({','.join(i.get('currencies', []))}; ops: 70 % transfers, 30 % holds/refunds/payouts)",
         _num(i.get("settled_per_s")),
         _target(i_ratio, (i_ratio or 0) >= 1.0, f"{_num(i_ratio, 2)} x a  (target >= 1.0)")),
        ("i", "ledger audit after the drain", _audit(_get(i, "audit", "ok")), ""),
        ("c", f"GET /currencies req/s (trivial; {c.get('clients', '-')} clients, "
         f"{c.get('tool', '-')})", _num(_get(c, "trivial", "requests_per_s")), "reference of c"),
        ("c", "GET /health req/s (DB + Redis round trip)",
         _num(_get(c, "health", "requests_per_s")), ""),
        ("c", "POST transfer req/s (Basic Auth)", _num(_get(c, "post", "requests_per_s")),
         _target(c_ratio, (c_ratio or 0) >= 0.5, f"{_num(c_ratio, 2)} x trivial  (target >= 0.5)")),
        ("c", f"POST batch transfers/s ({_get(results, 'config', 'batch_items')} per request)",
         _num(_get(c, "batch", "transfers_per_s")),
         f"{_num(c.get('ratio_batch_to_trivial'), 2)} x trivial"),
        ("d", f"submit -> settled p50/p95/p99 ms at {_num(d.get('rate_per_s'))}/s",
         _ms(e2e, "p50", "p95", "p99"),
         _target(e2e.get("p99"), (e2e.get("p99") or 0) < 100, "p99 target < 100 ms")),
    ]  # fmt: skip
    for key, label in (("get_transfer", "GET transfer"), ("list_100", "GET list, 100 rows")):
        p99 = _get(e, key, "latency_ms", "p99")
        rows.append((
            "e", f"{label} p50/p99 ms ({_num(e.get('transfers_in_table'))} transfers)",
            _ms(_get(e, key, "latency_ms"), "p50", "p99"),
            _target(p99, (p99 or 0) < 20, "p99 target < 20 ms"),
        ))  # fmt: skip
    for group in ("web", "worker"):
        g = f.get(group) or {}
        rows.append((
            "f", f"{group} RSS MiB start -> after {_num(f.get('settlements'))} settlements",
            f"{_num(g.get('rss_start_mib'), 1)} -> {_num(g.get('rss_after_mib'), 1)}",
            f"{_num(g.get('rss_growth_pct'), 1)} % (since {g.get('warm_snapshot', 'warm')}: "
            f"{_num(g.get('rss_growth_since_warm_pct'), 1)} %)",
        ))  # fmt: skip
    rows.append(("f", "final ledger audit", _audit(_get(f, "final_audit", "ok")), ""))
    keys, warm = cold_start.get("ratio_keys_to_basic"), cold_start.get("ratio_cold_to_warm_keys")
    runs = {name: cold_start.get(name) or {} for name in ("basic_cold", "keys_cold", "keys_warm")}
    rate = {name: _num(run.get("requests_per_s")) for name, run in runs.items()}
    cold = runs["basic_cold"]
    shape = f"{_num(cold.get('clients'))} new clients x {cold.get('requests_per_client', '-')}"
    rows += [
        ("g", f"POST req/s, {shape}, Basic", rate["basic_cold"], "reference of g"),
        ("g", f"POST req/s, {shape}, API keys", rate["keys_cold"],
         _target(keys, (keys or 0) >= 4, f"{_num(keys, 2)} x Basic  (target >= 4)")),
        ("g", f"POST req/s, same traffic from {_num(runs['keys_warm'].get('clients'))} warm keys",
         rate["keys_warm"],
         _target(warm, (warm or 0) >= 0.8, f"cold = {_num(warm, 2)} x warm  (target >= 0.8)")),
    ]  # fmt: skip
    fanout = _get(h, "steady", "settled_to_delivered_ms") or {}
    backlog = h.get("backlog") or {}
    rows += [
        ("h", f"settled -> delivered p50/p95/p99 ms at {_num(h.get('rate_per_s'))}/s",
         _ms(fanout, "p50", "p95", "p99"),
         _target(fanout.get("p99"), (fanout.get("p99") or 0) < 1000, "p99 target < 1 s")),
        ("h", f"deliveries/s, backlog of {_num(_get(backlog, 'deliveries', 'delivered'))}",
         _num(backlog.get("delivered_per_s")), f"{h.get('webhooks', '-')} webhooks"),
    ]  # fmt: skip
    for name, run in (phases.get("j", {}).get("summary") or {}).items():
        alone, flood = run["quiet_p50_p99_ms"], run["flood_p50_p99_ms"]
        rows.append((
            "j", f"signed-in GET p50/p99 ms, 48 registering, {name.replace('_', ' ')}",
            _ms(dict(zip(("p50", "p99"), flood, strict=True)), "p50", "p99"),
            _target(flood[1], flood[1] < 100, f"alone {_num(alone[1], 1)}; p99 target < 100 ms"),
        ))  # fmt: skip

    header = ("", "measure", "value", "ratio / target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    cores = _get(results, "machine", "cores") or 2
    lines = [
        f"Remit bench — {results.get('mode')} run of {results.get('started_at')} "
        f"({cores} cores, shared machine)",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows:
        cells = (row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3])
        lines.append("  ".join(cells).rstrip())
    if errors := [f"phase {k}: {v['error']}" for k, v in phases.items() if "error" in v]:
        lines.append("errors: " + "; ".join(errors))
    lines.append(
        f"CPU seconds per phase ({cores} cores = {cores} s per wall second): "
        + " / ".join(CPU_COLUMNS).replace("bench", "bench+load generator")
    )
    for key, section in phases.items():
        cpu = section.get("cpu_s") or {}
        line = f"  {key}: wall {_num(cpu.get('wall_s'), 1)} s — " + " / ".join(
            _num(cpu.get(column), 1) for column in CPU_COLUMNS
        )
        capacity = cores * (cpu.get("wall_s") or 0)
        if capacity and (cpu.get("other") or 0) > 0.1 * capacity:
            line += f"   <- {100 * cpu['other'] / capacity:.0f} % of the CPU went to others"
        lines.append(line)
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    """Throughput, latency, the backlog drain and memory, in one PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    phases = results.get("phases", {})
    figure = Figure(figsize=(14, 9), layout="tight")
    (throughput, latency), (drain, memory) = figure.subplots(2, 2)
    figure.suptitle(
        f"Remit bench — {results.get('mode')} run {results.get('started_at')} "
        f"({_get(results, 'machine', 'cores')} cores, shared machine)"
    )
    bars = [
        ("a pgbench tps", ("a", "tps")),
        ("b settled/s", ("b", "settled_per_s")),
        ("i mix settled/s", ("i", "settled_per_s")),
        ("c GET /currencies", ("c", "trivial", "requests_per_s")),
        ("c GET /health", ("c", "health", "requests_per_s")),
        ("c POST transfer", ("c", "post", "requests_per_s")),
        ("c batch transfers/s", ("c", "batch", "transfers_per_s")),
        ("h webhook deliveries/s", ("h", "backlog", "delivered_per_s")),
    ]
    if shown := [(label, v) for label, path in bars if (v := _get(phases, *path)) is not None]:
        labels, values = zip(*shown, strict=True)
        colors = ["#777" if label.startswith("a ") else "#2a7" for label in labels]
        throughput.bar_label(throughput.barh(labels, values, color=colors), fmt="%.0f", padding=3)
        throughput.invert_yaxis()
    throughput.set_title("throughput (per second)")

    sections = [
        ("d submit→settled", ("d", "submit_to_settled_ms")),
        ("d submit (POST)", ("d", "submit_response_ms")),
        ("e GET transfer", ("e", "get_transfer", "latency_ms")),
        ("e GET list 100", ("e", "list_100", "latency_ms")),
        ("h settled→delivered", ("h", "steady", "settled_to_delivered_ms")),
    ]
    shown = [(label, s) for label, path in sections if _get(s := _get(phases, *path), "p50")]
    for offset, key in enumerate(("p50", "p95", "p99")):
        xs = [i + (offset - 1) * 0.25 for i in range(len(shown))]
        latency.bar(xs, [s.get(key) or 0 for _, s in shown], 0.25, label=key)
    latency.set_xticks(range(len(shown)), [label for label, _ in shown], fontsize=8)
    latency.set_yscale("log")
    latency.axhline(100, color="red", linestyle=":", linewidth=1)
    latency.axhline(20, color="orange", linestyle=":", linewidth=1)
    latency.set(ylabel="ms (log)", title="latency (p99 targets: d < 100 ms, e < 20 ms, h < 1 s)")
    latency.legend()

    series = _get(phases, "b", "pending_over_time") or []
    drain.plot([t for t, _ in series], [n for _, n in series], color="#2a7", label="b")
    series = _get(phases, "i", "left_over_time") or []
    drain.plot([t for t, _ in series], [n for _, n in series], color="#a27", label="i (mix)")
    drain.set(xlabel="seconds since the doorbell", ylabel="pending operations")
    drain.set_title("b, i: backlog drained by the worker pool")
    drain.legend()

    snapshots = results.get("memory", {})
    labels = [label for label in snapshots if isinstance(snapshots[label], dict)]
    for group, color in (("web", "#27a"), ("worker", "#a72")):
        for key, style, name in (("rss_kib", "-", "RSS (sum)"), ("pss_kib", "--", "PSS")):
            values = [(snapshots[label].get(group) or {}).get(key, 0) / 1024 for label in labels]
            memory.plot(
                labels, values, marker="o", linestyle=style, color=color, label=f"{group} {name}"
            )
    memory.set(ylabel="MiB", title="f: memory of the stack over the run")
    memory.legend()
    memory.tick_params(axis="x", labelsize=8)
    figure.savefig(path, dpi=90)
