"""The chaos suite's machinery: throwaway servers, the real processes, and probes.

Everything runs on loopback against a PostgreSQL and a Redis started here from the
installed binaries (never the system services, which other test runs share): these
may be flushed, killed and restarted at will. The app processes get their whole
environment from here, nothing inherited from the pytest process's settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

from ops import services
from ops.servers import Postgres as PostgresServer
from ops.servers import Redis as RedisServer
from ops.servers import ServerError, free_port
from ops.supervisor import Process

ROOT = Path(__file__).resolve().parents[2]
SUPERUSER_PASSWORD = "chaos-superuser-password"
SECRET_KEY = secrets.token_hex(32)


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until predicate() is truthy and return it; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# Durability off: the chaos suite tests crashes of the app, not of the disk.
CHAOS_PG_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "'64MB'",
}


def socket_owner(local_port: int, remote_port: int, processes: list[psutil.Process]) -> int | None:
    """Which of `processes` holds the TCP socket 127.0.0.1:local_port -> :remote_port."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for connection in process.net_connections(kind="tcp"):
                if (
                    connection.laddr
                    and connection.raddr
                    and connection.laddr.port == local_port
                    and connection.raddr.port == remote_port
                ):
                    return process.pid
    return None


class AppProcess(Process):
    """One real process (gunicorn, a Celery worker node, beat) in its own process group,
    its output appended to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, argv, env, log=log_dir / f"{name}.log")
        self.log_path: Path = log_dir / f"{name}.log"
        self._log_offset = 0
        # Set when the test itself ends the process (kill, SIGTERM, stop): any other
        # exit is a crash, which the stack's watcher records.
        self.expected_exit = False

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts + 1} of {self.name} =====\n".encode())
        super().start()
        self._log_offset = self.log_path.stat().st_size
        # Only now: until the new process runs, the watcher must not take the old one's
        # end for a crash.
        self.expected_exit = False

    def log_since_start(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def problems_logged(self) -> dict[str, int]:
        """ERROR and CRITICAL lines of the JSON log, counted by logger and message start."""
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError), self.log_path.open(errors="replace") as log:
            for line in log:
                if not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("level") in ("ERROR", "CRITICAL"):
                    message = str(record.get("message", "")).splitlines()[0][:70]
                    key = f"{record.get('logger')}: {message}"
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def kill(self) -> None:
        """SIGKILL the whole group, like a container being killed."""
        self.expected_exit = True
        super().kill()

    def stop(self, timeout: float = 30, hurry: Callable[[], bool] = lambda: False) -> bool:
        self.expected_exit = True
        return super().stop(timeout, hurry)


class Stack:
    """The app's processes against one database on the throwaway servers."""

    def __init__(
        self,
        pg: PostgresServer,
        redis_server: RedisServer,
        database: str,
        log_dir: Path,
        *,
        redis_url: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.pg = pg
        self.redis = redis_server
        self.database = database
        self.log_dir = log_dir
        self.redis_url = redis_url or redis_server.url(0)
        self.web_port = free_port()
        self.settings = {
            "WEB_CONCURRENCY": "2",
            "WORKER_CONCURRENCY": "2",
            "SWEEP_PENDING_AFTER": "3",
            "SWEEP_INTERVAL": "2",
            "VISIBILITY_TIMEOUT": "10",
            "SETTLE_BATCH_SIZE": "100",
            "FAILED_RETRY_INTERVAL": "2",
            **(settings or {}),
        }
        self.processes: dict[str, AppProcess] = {}
        self.crashes: list[str] = []
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, name: str, *, redis_url: str | None = None) -> dict[str, str]:
        env = {
            key: os.environ[key]
            for key in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
            if key in os.environ
        }
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "REMIT_ENV": "test",
                "REMIT_LOG_SETUP": "1",
                "LOG_LEVEL": "INFO",
                "REMIT_APP_NAME": f"remit-{name}",
                "DATABASE_URL": self.pg.url(self.database),
                "REDIS_URL": redis_url or self.redis_url,
                "SUPERUSER_PASSWORD": SUPERUSER_PASSWORD,
                "SECRET_KEY": SECRET_KEY,
                "PORT": str(self.web_port),
                "ARGON2_TIME_COST": "1",
                "ARGON2_MEMORY_KIB": "1024",
                "LOGIN_FAILURES_PER_ADDRESS": "1000000",
                "LOGIN_FAILURES_PER_USERNAME": "1000000",
                "REGISTRATIONS_PER_ADDRESS": "1000000",
                "HASH_CONCURRENCY": "64",
                **self.settings,
            }
        )
        return env

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """A one-shot command (migrate, audit) with the stack's environment."""
        return subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env={**self.env("tool"), **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def migrate(self) -> None:
        result = self.run("-m", "worker.cli", "migrate")
        assert result.returncode == 0, result.stdout + result.stderr

    def audit(self) -> tuple[int, str]:
        result = self.run("-m", "worker.cli", "audit")
        return result.returncode, (result.stdout + result.stderr).strip()

    def _add(self, name: str, argv: list[str], redis_url: str | None) -> AppProcess:
        process = AppProcess(name, argv, self.env(name, redis_url=redis_url), self.log_dir)
        self.processes[name] = process
        return process

    def start_web(self, *, redis_url: str | None = None) -> AppProcess:
        command = services.command("web", bind=f"127.0.0.1:{self.web_port}")
        web = self._add("web", command, redis_url)
        web.start()
        return web

    def wait_web(self, timeout: float = 60) -> None:
        web = self.processes["web"]

        def listening() -> bool:
            assert web.alive(), f"web exited:\n{web.log_tail()}"
            try:
                requests.get(self.base_url + "/currencies", timeout=2)
            except requests.RequestException:
                return False
            return True

        wait_until(listening, timeout, 0.2, "the web to answer")

    def start_worker(self, name: str, *, redis_url: str | None = None) -> AppProcess:
        worker = self._add(name, services.command("worker", hostname=f"{name}@%h"), redis_url)
        worker.start()
        return worker

    def restart(self, name: str) -> AppProcess:
        process = self.processes[name]
        process.start()
        return process

    def wait_worker_ready(self, name: str, timeout: float = 60) -> None:
        worker = self.processes[name]

        def ready() -> bool:
            assert worker.alive(), f"{name} exited:\n{worker.log_tail()}"
            return " ready." in worker.log_since_start()

        wait_until(ready, timeout, 0.2, f"worker {name} to be ready")

    def start_webhooks(self) -> AppProcess:
        """The delivery worker, by the command compose runs (`./run.sh webhooks`), with
        the stack's WEBHOOK_CONCURRENCY (ops.services reads it from this process's)."""
        command = services.command("webhooks", hostname="webhooks@%h")
        threads = self.settings.get("WEBHOOK_CONCURRENCY")
        if threads:
            command[command.index("--concurrency") + 1] = threads
        webhooks = self._add("webhooks", command, None)
        webhooks.start()
        return webhooks

    def start_beat(self, *, redis_url: str | None = None) -> AppProcess:
        command = services.command("beat", schedule=self.log_dir / "beat-schedule")
        beat = self._add("beat", command, redis_url)
        beat.start()
        return beat

    def watch(self) -> None:
        """Record every process that exits on its own, and start it again as a process
        supervisor would (docker compose's restart policy), so the run goes on."""

        def loop() -> None:
            while self._watching.is_set():
                for name, process in list(self.processes.items()):
                    if process.popen is None or process.expected_exit:
                        continue
                    status = process.popen.poll()
                    if status is not None:
                        last = process.log_tail(8).replace("\n", " | ")[-600:]
                        self.crashes.append(f"{name} exited on its own ({status}): {last}")
                        process.kill()
                        process.start()
                time.sleep(0.2)

        self._watching.set()
        self._watcher = threading.Thread(target=loop, name="stack-watcher", daemon=True)
        self._watcher.start()

    def unwatch(self) -> None:
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join(5)

    def stop_all(self) -> None:
        self.unwatch()
        for process in reversed(list(self.processes.values())):
            process.stop(timeout=20)

    # --- probes ---------------------------------------------------------------------------

    def status_counts(self) -> dict[str, int]:
        """Transfers by status, straight from the database."""
        with self.pg.connect(self.database) as connection:
            rows = connection.execute("SELECT status, count(*) FROM transfers GROUP BY status")
            return dict(rows.fetchall())

    def settling_backend(self, worker: str) -> int | None:
        """The OS pid of `worker`'s process that is inside a settlement batch right now:
        its database backend is in the postings insert (the slow-batch trigger's sleep),
        i.e. after the claim and the account locks and before the commit."""
        process = self.processes[worker]
        if not process.alive():
            return None
        with self.pg.connect() as connection:
            rows = connection.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = %s AND wait_event = 'PgSleep'",
                (self.database, f"remit-{worker}"),
            ).fetchall()
        processes = [psutil.Process(process.pid), *process.tree()]
        for (client_port,) in rows:
            if client_port is None:
                continue
            owner = socket_owner(client_port, self.pg.port, processes)
            if owner is not None:
                return owner
        return None


SLOW_BATCH_FUNCTION = """
CREATE OR REPLACE FUNCTION chaos_slow_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_sleep((SELECT batch_delay FROM chaos_knobs LIMIT 1));
  RETURN NULL;
END $$
"""


def install_slow_batches(pg: PostgresServer, database: str, delay: float) -> None:
    """Widen the settlement transaction: every batch's postings insert sleeps `delay`
    seconds inside the batch's transaction, while it holds the currency's lock and its
    accounts. Test instrumentation on the throwaway database only: the kill windows."""
    with pg.connect(database) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS chaos_knobs (batch_delay float8 NOT NULL)")
        connection.execute("DELETE FROM chaos_knobs")
        connection.execute("INSERT INTO chaos_knobs VALUES (%s)", (delay,))
        connection.execute(SLOW_BATCH_FUNCTION)
        connection.execute(
            "CREATE OR REPLACE TRIGGER chaos_slow_batch BEFORE INSERT ON postings "
            "FOR EACH STATEMENT EXECUTE FUNCTION chaos_slow_batch()"
        )


@contextlib.contextmanager
def throwaway_servers() -> Iterator[tuple[PostgresServer, RedisServer]]:
    pg = PostgresServer(settings=CHAOS_PG_SETTINGS)
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="remit-chaos-redis-")))
    try:
        # A free port found a moment ago may be taken meanwhile: try another one.
        for attempt in range(3):
            try:
                pg.start()
                break
            except ServerError:
                if attempt == 2:
                    raise
                pg.port = free_port()
        for attempt in range(3):
            try:
                redis_server.start()
                break
            except ServerError:
                if attempt == 2:
                    raise
                redis_server.port = free_port()
        yield pg, redis_server
    finally:
        redis_server.destroy()
        pg.destroy()


def kept_logs(suite: str, failed: list[str]) -> Iterator[Path]:
    """A fixture body: a fresh folder for the run's process logs under .run/`suite`,
    removed afterwards unless a test of the suite failed (`failed`, filled by the
    conftest's report hook) or CHAOS_KEEP_LOGS=1."""
    path = ROOT / ".run" / suite / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    if not failed and not os.environ.get("CHAOS_KEEP_LOGS"):
        shutil.rmtree(path, ignore_errors=True)
