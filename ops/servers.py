"""Throwaway PostgreSQL and Redis servers, from the installed binaries.

One implementation for `./run.sh up` and `test` (when nothing answers on the default
ports), for the benchmark and for the chaos suite. PostgreSQL refuses to run as root:
as root, its commands run as the `postgres` user (else `nobody`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ops import ROOT

if TYPE_CHECKING:
    import psycopg

# psycopg and redis are imported where used: `./run.sh test` and the services need not
# pay for them before their own start.


class ServerError(RuntimeError):
    """A server could not be found, started or stopped; the message says what to do."""


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept TCP connections there?"""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def shown(path: Path) -> str:
    """A path as messages show it: relative to the checkout when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def find_pg_bin(version: str | None = None) -> Path:
    """The folder with initdb and pg_ctl: `version`'s if installed, else the newest under
    /usr/lib/postgresql (Debian keeps them off PATH), else PATH's."""
    if version and (Path("/usr/lib/postgresql") / version / "bin" / "pg_ctl").exists():
        return Path("/usr/lib/postgresql") / version / "bin"
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(pg_ctl).parent
    raise ServerError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")


def unprivileged_user() -> str | None:
    """The user a PostgreSQL server (or pgbouncer) runs as when we are root, which both
    refuse: `postgres`, else `nobody`; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


class Postgres:
    """A PostgreSQL cluster of our own in `folder` (data/, server.log), on 127.0.0.1:`port`
    (a free one if 0). initdb runs at the first start, with `settings` appended to its
    postgresql.conf. Unix socket in `socket_dir` if given, else TCP only. It can be stopped
    in any mode and started again on the same port (the chaos suite restarts it).

    `movable`: where the PostgreSQL user cannot write `folder` (a checkout under a private
    home), use a temporary folder instead of refusing."""

    def __init__(
        self,
        folder: Path | None = None,
        settings: dict[str, str] | None = None,
        *,
        port: int = 0,
        socket_dir: Path | None = None,
        movable: bool = True,
    ) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="remit-pg-"))
        self.settings = settings or {}
        self.port = port
        self.socket_dir = socket_dir
        self.movable = movable
        self.os_user = unprivileged_user()
        self.started = False
        self.bin = find_pg_bin(self._data_version())

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def _data_version(self) -> str | None:
        with contextlib.suppress(OSError):
            return (self.folder / "data" / "PG_VERSION").read_text().strip()
        return None

    def _as_pg_user(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        if self.os_user is not None:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        # From / so that the server never depends on the caller's working directory; in a
        # session of its own so that a terminal's Ctrl-C does not reach the server.
        return subprocess.run(  # type: ignore[call-overload]
            argv, cwd="/", check=False, start_new_session=True, **kwargs
        )

    def _pg_ctl(self, *args: str, what: str) -> None:
        result = self._as_pg_user(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise ServerError(f"{what}, see {shown(self.log)}")

    @property
    def version(self) -> str:
        out = subprocess.run(
            [str(self.bin / "postgres"), "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    @property
    def major(self) -> str:
        return self.version.split()[-1].split(".")[0]

    def _place(self) -> None:
        for folder in (self.folder, self.socket_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                if self.os_user is not None:
                    shutil.chown(folder, self.os_user)
        if (
            self.os_user is None
            or self._as_pg_user(["test", "-w", str(self.folder)]).returncode == 0
        ):
            return
        if not self.movable:
            raise ServerError(
                f"user {self.os_user} cannot write {self.folder} (a parent folder closed to "
                "other users?): open it (chmod o+x on the parents), or set DATABASE_URL"
            )
        self.folder = Path(tempfile.mkdtemp(prefix="remit-pg-"))
        shutil.chown(self.folder, self.os_user)

    def init(self) -> None:
        # A half-made cluster from an interrupted initdb: initdb wants the folder empty.
        shutil.rmtree(self.data, ignore_errors=True)
        log = self.folder / "initdb.log"
        with log.open("w") as out:
            if self.os_user is not None:
                shutil.chown(log, self.os_user)
            result = self._as_pg_user(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, timeout=120,
            )  # fmt: skip
        if result.returncode != 0:
            raise ServerError(f"initdb failed, see {shown(log)}")
        if self.settings:
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write("\n# remit's throwaway server\n")
                conf.writelines(f"{name} = {value}\n" for name, value in self.settings.items())

    def needs_init(self) -> bool:
        return not (self.data / "PG_VERSION").exists()

    def start(self) -> None:
        """Start (after initdb, the first time); the port stays the same across restarts."""
        self._place()
        made = self._data_version()
        if made is not None and made != self.major:
            raise ServerError(
                f"{shown(self.data)} was made by PostgreSQL {made}, but only version "
                f"{self.major} was found: delete {shown(self.folder)} (throwaway data) "
                "to recreate it"
            )
        if self.needs_init():
            self.init()
        if not self.port:
            self.port = free_port()
        # A unix socket path is limited to 107 bytes: in a deeply nested clone, TCP only.
        sockets = str(self.socket_dir) if self.socket_dir and len(str(self.socket_dir)) < 80 else ""
        # pg_ctl hands -o to /bin/sh, hence the quoting.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {shlex.quote(sockets)}"
        self._pg_ctl(
            "-l", str(self.log), "-o", options, "-w", "-t", "60", "start",
            what="the throwaway PostgreSQL did not start",
        )  # fmt: skip
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        if not self.started:
            return
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop", what="pg_ctl stop failed")
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
        import psycopg

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


class Redis:
    """A redis-server of our own, a child in a session of its own, on 127.0.0.1:`port` (a
    free one if 0). It can be stopped and started again on the same port. Nothing is
    saved: Redis only carries doorbells, PostgreSQL is the source of truth."""

    def __init__(self, folder: Path, *, port: int = 0) -> None:
        self.folder = folder
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.folder / "redis.log"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("no redis-server: apt-get install redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self.starts += 1
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(
                        f"the throwaway Redis does not answer on 127.0.0.1:{self.port}, "
                        f"see {shown(self.log)}"
                    )
                time.sleep(0.1)
        finally:
            client.close()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, *args: str) -> object:
        import redis

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
