"""`python -m bench [--quick]`: start the stack on throwaway servers, run the phases,
print the table, write bench/results/<timestamp>.json and .png. See bench/README.md."""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import psutil
import psycopg
from aiohttp import BasicAuth

from bench import data, load, phases, procs, report, say, stack
from bench.config import RECORDED_KNOBS, ROOT, Config, parse_args
from ops.servers import Postgres, Redis, free_port

# Major units per funded account: no bench transfer is refused for lack of funds.
FUND_MAJOR = 10_000_000


class Bench:
    """The run's servers, processes, data and results; phases (bench.phases) use it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        # The pid too: two runs may start within the same second (the test suite's smoke runs).
        self.folder = ROOT / ".run" / "bench" / f"{self.stamp}-{os.getpid()}"
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres(self.folder / "pg", stack.PG_SETTINGS)
        self.redis = Redis(self.folder / "redis")
        self.processes: dict[str, Any] = {}  # web, worker, webhooks (ops.supervisor.Process)
        self.conn: Any = None
        self.env: dict[str, str] = {}
        self.port = 0
        self.password = secrets.token_urlsafe(12)
        self.password_hash = ""
        self.users: list[data.BenchUser] = []
        self.payers: tuple[load.Payer, ...] = ()
        self.payees: tuple[int, ...] = ()
        self.loaded = 0  # settled transfers written by SQL (funding, history), not the worker
        self.verify_s = 0.1
        self.meter = procs.CpuMeter()
        self.failed = False
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "version": 2,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": config.mode,
            "config": asdict(config),  # json.dumps writes its Path as text
            "machine": {
                "cores": os.cpu_count(),
                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "note": "shared machine: others may use CPU meanwhile (cpu_s.other)",
            },
            "code": code_info(),
            "phases": {},
            "memory": {},
        }

    def start_servers(self) -> None:
        say(f"run folder {self.folder.relative_to(ROOT)}")
        self.pg.start()
        self.redis.start()
        self.meter.groups["postgres"] = self.pg.postmaster_pid() or 0
        self.meter.groups["redis"] = self.redis.pid or 0
        pg, redis = self.pg, self.redis
        self.results["servers"] = {
            "postgres": {"version": pg.version, "port": pg.port, "settings": stack.PG_SETTINGS},
            "redis": {"port": redis.port},
        }
        say(f"PostgreSQL on 127.0.0.1:{pg.port}, Redis on 127.0.0.1:{redis.port}")

    def start_stack(self) -> None:
        """Migrate, load the users and their funding, start gunicorn and the worker."""
        pg_url, redis_url, self.port = self.pg.url("remit"), self.redis.url(0), free_port()
        self.env = stack.environment(self.config, pg_url, redis_url, self.port, self.folder)
        # This process imports the project (doorbells, audit, hashing) only from here on.
        os.environ.update(self.env)
        self.results["knobs"] = {k: self.env[k] for k in RECORDED_KNOBS if self.env.get(k)}
        stack.migrate(self.env, self.logs)

        from common.passwords import hash_password, verify_password

        self.conn = psycopg.connect(self.pg.conninfo("remit"), autocommit=True)
        known = {code for (code,) in self.conn.execute("SELECT code FROM currencies")}
        if unknown := set(self.config.currencies) - known:
            raise ValueError(f"--currencies: no currency {', '.join(sorted(unknown))}")
        say("loading users and their funding")
        password_hash = self.password_hash = hash_password(self.password)
        self.users = data.create_users(self.conn, self.config.users, password_hash)
        user_ids = [user.id for user in self.users]
        self.loaded += data.fund(self.conn, user_ids, self.config.currencies, FUND_MAJOR)
        # The HTTP clients: the first --clients users pay, any user may be paid.
        code = self.config.currencies[0]
        self.payers = tuple(
            load.Payer(u.id, BasicAuth(u.username, self.password).encode(), u.accounts[code])
            for u in self.users[: self.config.clients]
        )
        self.payees = tuple(user.accounts[code] for user in self.users)
        # What one verification costs here (the auth warm-up tells cache hits by it).
        started = time.perf_counter()
        verify_password(0, self.password, password_hash)
        self.verify_s = time.perf_counter() - started
        self.results["argon2_verify_ms"] = round(self.verify_s * 1000, 1)

        config = self.config
        say(f"starting gunicorn ({config.web_workers}) and the worker ({config.worker_processes})")
        started = self.processes  # each kept as soon as started: stop() stops it
        started["web"] = stack.start("web", self.env, self.logs, bind=f"127.0.0.1:{self.port}")
        started["worker"] = stack.start("worker", self.env, self.logs)
        # The delivery worker in REMIT_ENV=test, its one difference from production here:
        # it may deliver to loopback, where phase h's receiver listens.
        started["webhooks"] = stack.start("webhooks", self.env | {"REMIT_ENV": "test"}, self.logs)
        self.meter.groups |= {name: process.pid for name, process in started.items()}
        web, worker, webhooks = started.values()
        stack.wait_until(web, lambda: stack.http_ok(self.port), "gunicorn")
        pool = config.worker_processes
        stack.wait_until(worker, lambda: stack.worker_ready(worker, pool), "the worker")
        stack.wait_until(webhooks, lambda: stack.worker_ready(webhooks, 0, "webhooks"), "webhooks")
        self.remember_memory("start")

    def remember_memory(self, label: str) -> None:
        groups = {name: self.processes[name].pid for name in ("web", "worker")}
        snapshot = procs.memory_snapshot(groups)
        snapshot["at_s"] = round(time.monotonic() - self.started, 1)
        self.results["memory"][label] = snapshot

    def phase(self, key: str, title: str, work: Callable[[Bench], dict]) -> None:
        """One phase, from a drained queue: its result, time, CPU split, memory after."""
        say(f"phase {key}: {title}")
        before, started = self.meter.sample(), time.perf_counter()
        try:
            if self.processes:
                phases.drain(self)
            result = work(self)
        except Exception as error:
            result = {"error": self.fail(f"phase-{key}", error)}
        result["title"] = title
        result["phase_seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_s"] = self.meter.between(before, self.meter.sample())
        self.results["phases"][key] = result
        if self.processes:
            self.remember_memory(f"after_{key}")
            for process in self.processes.values():
                stack.check(process)

    def fail(self, what: str, error: Exception) -> str:
        self.failed = True
        (path := self.logs / f"{what}-error.txt").write_text(traceback.format_exc())
        say(f"{what} failed: {error!r} (traceback in {path})")
        return repr(error)

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        for process in self.processes.values():
            process.stop()
        self.redis.stop()
        self.pg.stop()

    def write_results(self) -> None:
        """<timestamp>.json, <timestamp>.png and the table on stdout."""
        self.results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.results["ok"] = not self.failed
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.config.out_dir / f"{self.stamp}.json"
        json_path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        png_path = json_path.with_suffix(".png")
        try:
            report.chart(self.results, png_path)
        except Exception as error:
            say(f"chart not drawn: {error!r}")
        print(report.table(self.results))
        say(f"results: {json_path}" + (f" and {png_path.name}" if png_path.exists() else ""))


def code_info() -> dict[str, Any]:
    """The commit measured, and how many files of the work tree differed from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()
        changed = subprocess.check_output([*git, "status", "--porcelain"], text=True)
        return {"commit": commit, "changed_files": len(changed.splitlines())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "changed_files": None}


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    # SIGINT and SIGTERM stop the run cleanly, even where SIGINT was ignored (background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bench = Bench(config)
    interrupted = False
    try:
        bench.start_servers()
        if "a" in config.phases:  # pgbench measures the server alone, before Remit starts
            bench.phase("a", *phases.ALL["a"])
        bench.start_stack()
        for key in config.phases.replace("a", ""):
            bench.phase(key, *phases.ALL[key])
    except KeyboardInterrupt:
        interrupted = bench.failed = True
        say("interrupted: stopping everything")
    except Exception as error:
        bench.results["error"] = bench.fail("run", error)
    finally:
        # Stopping is bounded (30 s at worst) and must not be cut short: no server outlives us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping the stack and the servers")
        bench.stop()
    bench.write_results()
    # PostgreSQL's folder is elsewhere when its OS user could not write the run folder.
    if bench.failed or config.keep:
        say(f"kept {bench.folder} and {bench.pg.folder} (logs, data)")
    else:
        for folder in (bench.folder, bench.pg.folder):
            shutil.rmtree(folder, ignore_errors=True)
    return 130 if interrupted else 1 if bench.failed else 0
