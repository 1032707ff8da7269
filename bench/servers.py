"""The benchmark's own throwaway PostgreSQL and Redis, never the shared ones.

PostgreSQL gets an initdb of its own in the run folder, on a free loopback port,
with settings sized for a benchmark but durable commits (fsync and
synchronous_commit stay on): the comparison with pgbench must be fair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

# Benchmark settings: memory for a 24 GiB machine shared with others, checkpoints
# spread out so none lands in the middle of a 20 s phase, and durability as in
# production. They are recorded with every result.
PG_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "300",
    "shared_buffers": "'1GB'",
    "effective_cache_size": "'4GB'",
    "work_mem": "'16MB'",
    "maintenance_work_mem": "'512MB'",
    "wal_buffers": "'16MB'",
    "max_wal_size": "'8GB'",
    "min_wal_size": "'1GB'",
    "checkpoint_timeout": "'30min'",
    "checkpoint_completion_target": "0.9",
    "random_page_cost": "1.1",
    # JIT compiles the occasional large audit query for longer than it runs.
    "jit": "off",
    # Durable, as in production: each commit waits for its WAL flush.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "log_min_duration_statement": "-1",
    # Where PostgreSQL's time goes, per phase (a few % of overhead, for pgbench too).
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "top",
    "log_checkpoints": "on",
}


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def find_pg_bin() -> Path:
    """The newest /usr/lib/postgresql/*/bin with initdb, else initdb from PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServerError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")


class Postgres:
    """A throwaway PostgreSQL cluster: initdb into `folder` (a temporary one if none),
    on a free loopback port, TCP only, run as an unprivileged user when we are root
    (PostgreSQL refuses to run as root). It can be stopped in any mode and started
    again on the same port: the chaos suite restarts it under load."""

    def __init__(self, folder: Path | None = None, settings: dict[str, str] | None = None) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="remit-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.bin = find_pg_bin()
        self.settings = PG_SETTINGS if settings is None else settings
        self.port = 0
        self.started = False
        self.os_user: str | None = None
        if os.geteuid() == 0:
            self.os_user = "postgres" if _user_exists("postgres") else "nobody"

    def _as_pg_user(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        if self.os_user is not None:
            command = ["runuser", "-u", self.os_user, "--", *command]
        return subprocess.run(command, cwd="/", check=False, **kwargs)  # type: ignore[call-overload]

    def _run(self, *argv: str) -> None:
        result = self._as_pg_user(list(argv), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServerError(
                f"{Path(argv[0]).name} failed ({result.returncode}): "
                f"{(result.stdout + result.stderr).strip()[-2000:]}\n"
                f"--- server log ---\n{self.log_tail()}"
            )

    @property
    def version(self) -> str:
        out = subprocess.run(
            [str(self.bin / "postgres"), "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    def _place(self) -> None:
        """The folder, or a temporary one where the PostgreSQL user cannot reach it
        (a checkout under a private home folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.os_user is None:
            return
        shutil.chown(self.folder, self.os_user)
        if self._as_pg_user(["test", "-w", str(self.folder)]).returncode != 0:
            self.folder = Path(tempfile.mkdtemp(prefix="remit-pg-"))
            shutil.chown(self.folder, self.os_user)
            self.data = self.folder / "data"
            self.log = self.folder / "server.log"

    def init(self) -> None:
        self._place()
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# remit's throwaway server\n")
            for name, value in self.settings.items():
                conf.write(f"{name} = {value}\n")

    def start(self) -> None:
        """Start (after initdb, the first time); the port stays the same across restarts."""
        if not (self.data / "PG_VERSION").exists():
            self.init()
        if not self.port:
            self.port = free_port()
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port}",
            "-w",
            "-t",
            "60",
            "start",
        )
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        if not self.started:
            return
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"
        )
        self.started = False

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists() and port_open(self.port)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.started = True
            with contextlib.suppress(ServerError):
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=5"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.conninfo(database), autocommit=True)

    def create_database(self, name: str) -> None:
        with self.connect() as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            connection.execute(f'CREATE DATABASE "{name}"')

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Redis:
    """A throwaway redis-server in the foreground, on a loopback port of its own; it can
    be stopped and started again on the same port (the chaos suite restarts it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("no redis-server: apt-get install redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self.starts += 1
        # Nothing to keep: Redis only carries doorbells.
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"redis-server did not start, see {self.folder}/redis.log")
                time.sleep(0.1)
        finally:
            client.close()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, *args: str) -> object:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
