"""The benchmark's quick mode end to end: it must keep working, whatever it measures.

Nothing here is timed: the numbers of a shared CI machine mean nothing. The test only
checks that one quick run starts its own servers and the real stack, goes through every
phase and writes a JSON result with sane values (and its chart), and cleans up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite's own settings (conftest) must not shape the benchmark's stack: cheap
# argon2, tiny batches, its test database and Redis DB, no logging setup.
SUITE_SETTINGS = {
    "REMIT_ENV",
    "DATABASE_URL",
    "REDIS_URL",
    "SUPERUSER_PASSWORD",
    "SECRET_KEY",
    "ARGON2_TIME_COST",
    "ARGON2_MEMORY_KIB",
    "SWEEP_PENDING_AFTER",
    "WORKER_CONCURRENCY",
    "WEB_CONCURRENCY",
    "REMIT_LOG_SETUP",
    "SETTLE_MAX_ATTEMPTS",
    "FAILED_RETRY_INTERVAL",
    "SETTLE_BATCH_SIZE",
    "PROMETHEUS_MULTIPROC_DIR",
    "REGISTRATIONS_PER_ADDRESS",
    "HASH_CONCURRENCY",
}


def _have_servers() -> bool:
    has_initdb = any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")
    return bool(has_initdb and shutil.which("redis-server"))


def _ordered(latency: dict) -> bool:
    return 0 < latency["p50"] <= latency["p99"] <= latency["max"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _have_servers(), reason="needs PostgreSQL server binaries and Redis")
def test_quick_bench_runs_every_phase(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SUITE_SETTINGS}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (result_path,) = tmp_path.glob("*.json")
    result = json.loads(result_path.read_text())
    assert result["ok"] is True
    assert result["mode"] == "quick"
    phases = result["phases"]
    assert sorted(phases) == list("abcdefghij")
    for key, phase in phases.items():
        assert "error" not in phase, (key, phase)
        assert phase["cpu_s"]["wall_s"] >= 0

    assert phases["a"]["tps"] > 0

    b = phases["b"]
    assert b["settled"] + b["rejected"] == b["backlog"] == result["config"]["backlog"]
    assert b["failed"] == 0
    assert b["settled_per_s"] > 0
    assert b["ratio_to_pgbench"] > 0
    assert b["audit"] == {**b["audit"], "ok": True, "violations": 0}

    i = phases["i"]
    kinds = {kind: sum(by.values()) for kind, by in i["outcomes"].items()}
    assert set(kinds) == {"transfer", "capture", "refund", "payout", "hold"}, kinds
    assert i["outcomes"]["hold"].get("voided", 0) > 0
    assert i["outcomes"]["hold"]["captured"] == i["outcomes"]["capture"]["settled"]
    assert i["operations"] == i["backlog"] == result["config"]["backlog"]
    assert i["failed"] == 0
    assert i["ratio_to_pgbench"] > 0
    assert i["audit"] == {**i["audit"], "ok": True, "violations": 0}

    c = phases["c"]
    assert c["tool"] in {"wrk", "python"}
    assert c["settled_while_paused"] == 0
    for name in ("trivial", "health", "post", "batch"):
        assert c[name]["requests"] > 0, name
        assert c[name]["requests_per_s"] > 0, name
        assert "status" not in c[name]["errors"], (name, c[name]["errors"])
    assert c["post"]["transfers_committed"] > 0
    assert c["batch"]["transfers_committed"] > 0
    assert c["ratio_post_to_trivial"] > 0
    assert c["ratio_batch_to_trivial"] > 0

    d = phases["d"]
    assert d["rate_per_s"] > 0
    assert d["outcomes"] == {"settled": d["operations"]}
    assert _ordered(d["submit_to_settled_ms"])
    assert d["submit_to_settled_ms"]["p50"] >= d["submit_response_ms"]["p50"]

    e = phases["e"]
    assert e["transfers_in_table"] >= result["config"]["history_total"]
    for kind in ("get_transfer", "list_100"):
        assert set(e[kind]["statuses"]) == {"200"}, e[kind]
        assert _ordered(e[kind]["latency_ms"])

    f = phases["f"]
    assert f["settlements"] >= result["config"]["settlements"]
    for group in ("web", "worker"):
        assert f[group]["rss_start_mib"] > 0
        assert f[group]["rss_after_mib"] > 0
        assert f[group]["processes"] >= 2
    assert f["final_audit"]["ok"] is True

    g = phases["g"]
    for run in ("basic_cold", "keys_cold", "keys_warm"):
        assert set(g[run]["statuses"]) == {"202"}, g[run]
        assert g[run]["requests"] == g["basic_cold"]["requests"] > 0
        assert g[run]["requests_per_s"] > 0
    assert g["ratio_keys_to_basic"] > 0
    assert g["drain_after"]["pending_drained_s"] >= 0

    h = phases["h"]
    steady, backlog = h["steady"], h["backlog"]
    assert steady["outcomes"] == {"accepted": steady["operations"]}
    # Every delivery made, each event received once at least, every signature valid.
    assert set(steady["deliveries"]) == set(backlog["deliveries"]) == {"delivered"}
    assert steady["distinct_webhook_ids_received"] == steady["deliveries"]["delivered"] > 0
    assert _ordered(steady["settled_to_delivered_ms"])
    assert backlog["deliveries"]["delivered"] == 2 * backlog["transfers"]
    assert backlog["distinct_webhook_ids_received"] == backlog["deliveries"]["delivered"]
    assert backlog["delivered_per_s"] > 0
    assert set(h["receiver_statuses"]) == {"204"}

    j = phases["j"]
    bounded = j["after_default"]
    assert set(bounded["quiet"]["statuses"]) == set(bounded["under_flood"]["statuses"]) == {"200"}
    assert set(bounded["flood_statuses"]) <= {"201", "503"}, bounded
    # Some registrations get a hashing slot, the rest are refused.
    assert bounded["flood_statuses"].get("201", 0) > 0
    assert bounded["flood_statuses"].get("503", 0) > 0
    # With every default, one address's flood is refused by its limit.
    limited = j["per_address_limit"]
    assert set(limited["quiet"]["statuses"]) == set(limited["under_flood"]["statuses"]) == {"200"}
    assert set(limited["flood_statuses"]) <= {"201", "429"}, limited
    assert limited["flood_statuses"].get("429", 0) > 0

    chart = result_path.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A successful run leaves no servers' data behind.
    assert not list((ROOT / ".run" / "bench").glob(result_path.stem + "-*"))
