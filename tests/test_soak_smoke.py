"""The soak tool end to end in 12 seconds: it must keep working, whatever it measures.

Nothing here is timed: four 3-second buckets at a fixed rate (no capacity burst), and
the test checks the JSON's shape, the verdicts' presence and the chart, not their values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import ROOT, SUITE_SETTINGS, _have_servers


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _have_servers(), reason="needs PostgreSQL server binaries and Redis")
def test_short_soak_writes_its_buckets_and_verdicts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SUITE_SETTINGS}
    sizes = ["--minutes", "0.2", "--bucket-seconds", "3", "--rate", "20", "--users", "20"]
    command = [sys.executable, "-m", "bench.soak", *sizes, "--clients", "6", "--out", str(tmp_path)]
    run = subprocess.run(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=280, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (result_path,) = tmp_path.glob("soak-*.json")
    result = json.loads(result_path.read_text())
    assert result["ok"] is True
    assert result["kind"] == "soak"
    assert result["rate_per_s"] == 20
    assert result["rate_source"] == "--rate"
    assert result["audit"]["ok"] is True

    buckets = result["buckets"]
    assert [row["bucket"] for row in buckets] == [1, 2, 3, 4]
    for row in buckets:
        assert row["sent_per_s"] > 0
        assert row["settled_per_s"] >= 0
        for kind in ("rss_mib", "pss_mib", "uss_mib", "anon_mib", "processes"):
            assert set(row[kind]) == {"web", "worker", "postgres"}, kind
        assert all(value > 0 for value in row["rss_mib"].values())
        assert row["oldest_pending_s"] >= 0
        assert row["dead_tuples"] >= 0
        assert row["submit_to_settled_ms"]["count"] > 0
    assert sum(row["sent_per_s"] for row in buckets) * 3 == result["operations"] == 240

    kinds = {key.split(":")[0] for key in result["outcomes"]}
    assert kinds == {"transfer", "refund", "payout", "hold", "read_accounts", "read_transfers"}
    # Every operation ended as it should: settled, captured or voided, or a 200 read.
    assert all(
        outcome in {"settled", "capture_settled", "void_voided", "200"}
        for outcome in (key.split(":")[1] for key in result["outcomes"])
    ), result["outcomes"]

    verdicts = result["verdicts"]
    assert verdicts["warmup_buckets"] == 1
    assert verdicts["first_buckets"] == [2]
    assert verdicts["last_buckets"] == [4]
    for key in ("rss_web_mib", "rss_worker_mib", "anon_postgres_mib", "p99_ms"):
        assert verdicts[key]["judged"] is True, key
        assert isinstance(verdicts[key]["flat"], bool), key
    for key in ("rss_postgres_mib", "uss_postgres_mib"):
        assert verdicts[key]["judged"] is False, key
    assert verdicts["flat"] in {True, False}
    assert "verdicts:" in run.stdout

    chart = result_path.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((ROOT / ".run" / "bench").glob(result_path.stem.removeprefix("soak-") + "-*"))
