"""The floor of phase c's ratio on this machine: what any Flask route pays for one
PostgreSQL round trip, measured against a trivial route on the same gunicorn.

    .venv/bin/python -m bench.floor [--seconds 8] [--rounds 3] [--clients 32]

Serves bench/floor_app.py (no auth, validation, logging or metrics) with gunicorn in
the API's configuration (gthread, WEB_CONCURRENCY processes of WEB_THREADS threads,
keep-alive) on a scratch database of the local PostgreSQL, created here and dropped
after. wrk drives each route with the same clients as phase c, in turn, for `rounds`
rounds, and the table gives each route's req/s as a ratio to the trivial route of the
same round (the machine is shared: compare within a round, not across runs):

- trivial: a constant JSON body, as GET /currencies;
- form:    a form-encoded POST that is parsed, no round trip;
- select:  the same, plus one `SELECT` on the thread's own autocommit connection;
- insert:  the same, with one durable `INSERT ... RETURNING` instead.

Phase c asks a POST transfer for 0.5 x the trivial route. If `insert` stays under that,
no Flask route that commits a payment before answering can reach it on this machine,
whatever it leaves out (bench/README.md, "The floor of c").
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench.config import ROOT, tool_path
from common.settings import get_settings

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROUTES = ("trivial", "form", "select", "insert")
_POST_SCRIPT = """wrk.method = "POST"
wrk.body = "from=1&to=2&amount=1234&comment=lunch"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wrk(url: str, script: Path | None, clients: int, seconds: int) -> float:
    wrk = tool_path("wrk")
    if wrk is None:
        raise SystemExit("bench.floor needs wrk (apt-get install wrk)")
    command = [wrk, "-t2", f"-c{clients}", f"-d{seconds}s", url]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if re.search(r"Non-2xx or 3xx responses", out):
        raise RuntimeError(f"errors from {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no rate from wrk:\n{out}")
    return float(match.group(1))


def _wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("gunicorn exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="per route and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    settings = get_settings()
    database = f"remit_floor_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    port = _free_port()
    server = None
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(
                "CREATE TABLE floor_transfers (id bigserial PRIMARY KEY, from_account bigint,"
                " to_account bigint, amount bigint, comment text,"
                " created_at timestamptz NOT NULL DEFAULT now())"
            )
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "gunicorn"),
                "--worker-class=gthread",
                f"--workers={settings.web_concurrency}",
                f"--threads={settings.web_threads}",
                "--keep-alive=5",
                f"--bind=127.0.0.1:{port}",
                "bench.floor_app:app",
            ],
            cwd=ROOT,
            env={**os.environ, "FLOOR_DATABASE_URL": url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(port, server)
        with tempfile.TemporaryDirectory() as folder:
            script = Path(folder) / "post.lua"
            script.write_text(_POST_SCRIPT)
            base = f"http://127.0.0.1:{port}"
            _wrk(f"{base}/trivial", None, args.clients, 2)  # warm every thread
            _wrk(f"{base}/insert", script, args.clients, 2)
            rounds = []
            for number in range(1, args.rounds + 1):
                rates = {
                    route: _wrk(
                        f"{base}/{route}",
                        None if route == "trivial" else script,
                        args.clients,
                        args.seconds,
                    )
                    for route in ROUTES
                }
                rounds.append(rates)
                print(
                    f"round {number}: "
                    + ", ".join(
                        f"{route} {rate:,.0f} req/s ({rate / rates['trivial']:.2f})"
                        for route, rate in rates.items()
                    ),
                    flush=True,
                )
        print(
            f"\ngunicorn gthread, {settings.web_concurrency} x {settings.web_threads} threads,"
            f" {args.clients} wrk clients, {args.seconds} s per route and round"
        )
        print(f"{'route':<8} {'req/s (median)':>15} {'ratio to trivial (median of rounds)':>37}")
        for route in ROUTES:
            ratio = statistics.median(r[route] / r["trivial"] for r in rounds)
            rate = statistics.median(r[route] for r in rounds)
            print(f"{route:<8} {rate:>15,.0f} {ratio:>37.2f}")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
