"""Supervised processes: one server process (Process), and the stack of `./run.sh up`.

Each server runs in a session of its own: a terminal's Ctrl-C reaches only its
supervisor, which stops it with SIGTERM (the graceful stop of gunicorn and Celery; a
terminal's SIGINT is gunicorn's quick stop), and a SIGKILL can take its whole process
group, pool children included. psutil finds and waits for what is left of its tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import psutil

from ops import ROOT, RUN, die, say, servers, services
from ops.servers import port_open


class Process:
    """One server process. Its output goes to `log` (appended), else each line, prefixed
    with `[name] `, to this process's standard output."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
        log: Path | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._printer: threading.Thread | None = None

    def start(self) -> None:
        assert not self.alive(), f"{self.name} runs already"
        self.starts += 1
        out: IO[bytes] | int = subprocess.PIPE
        if self.log_path is not None:
            out = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            if not isinstance(out, int):
                out.close()
        if self.log_path is None:
            self._printer = threading.Thread(target=self._print, daemon=True)
            self._printer.start()

    def _print(self) -> None:
        """Until the server closes its output: its shutdown logs are printed too."""
        assert self.popen is not None
        assert self.popen.stdout is not None
        prefix = f"[{self.name}] ".encode()
        with contextlib.suppress(OSError, ValueError):
            for line in self.popen.stdout:
                sys.stdout.buffer.write(prefix + line)
                sys.stdout.buffer.flush()

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status; one killed by a signal N is 128 + N, as in the shell."""
        status = None if self.popen is None else self.popen.poll()
        return 128 - status if status is not None and status < 0 else status

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after `timeout` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tree(self) -> list[psutil.Process]:
        """The live processes below this one (gunicorn's workers, Celery's pool)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        """To the main process only (gunicorn and Celery handle their children)."""
        if self.alive():
            os.kill(self.pid, signum)

    def signal_group(self, signum: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the whole group, like a container being killed; returns when the
        process and what was left of its tree are gone."""
        if self.popen is None:
            return
        # Only while it runs: the pid of a process reaped already may be another's now.
        leftovers = self.tree() if self.alive() else []
        self.signal_group(signal.SIGKILL)
        for process in leftovers:  # one that left the group (setsid) all the same
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)
        psutil.wait_procs(leftovers, timeout=10)
        # An orphan of the group, reparented before we looked, is gone too before we return.
        deadline = time.monotonic() + 10
        while _group_alive(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._printer is not None:
            self._printer.join(5)

    def stop(self, timeout: float = 30, hurry: Callable[[], bool] = lambda: False) -> bool:
        """SIGTERM, then SIGKILL after `timeout` s (or as soon as `hurry()`). Returns False
        when it had to be killed."""
        if self.popen is None:
            return True
        graceful = True
        if self.alive():
            self.signal_group(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot exit
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.wait(0.2) is None:
                if hurry() or time.monotonic() >= deadline:
                    graceful = False
                    break
        self.kill()  # and whatever is left of its group, an orphaned pool child
        return graceful


def _group_alive(pgid: int) -> bool:
    """Is a process of group `pgid` still there (zombies count as gone)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


# How long each process of `up` may take to stop after SIGTERM before it is killed. The
# worker finishes the settlements it has started (warm shutdown); gunicorn lets requests,
# long polls included, finish.
STOP_TIMEOUT = {"web": 30.0, "worker": 30.0, "webhooks": 20.0}


class Up:
    """The stack of `./run.sh up`: web, both workers and beat, then Flower once the worker
    answers. One that dies stops them all; Ctrl-C or SIGTERM stops them cleanly, and a
    second Ctrl-C kills them at once."""

    def __init__(self, flower_generated: bool) -> None:
        self.flower_generated = flower_generated
        self.processes: list[Process] = []
        self.stop_signal: str | None = None
        self.stopping = False
        self.hurry = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is None and not self.stopping:
            self.stop_signal = signal.Signals(signum).name
        else:
            self.hurry = True

    def start(self, name: str, argv: list[str]) -> None:
        process = Process(name, argv)
        self.processes.append(process)
        process.start()

    def dead(self) -> Process | None:
        for process in self.processes:
            if not process.alive():
                say(f"{process.name} exited on its own (status {process.returncode}); "
                    "stopping the others")  # fmt: skip
                return process
        return None

    def wait_until(self, ready: Callable[[], bool], what: str, interval: float) -> bool:
        """Watches the processes until `ready()`; False on a stop, a death or 60 s."""
        deadline = time.monotonic() + 60
        while not ready():
            if self.stop_signal or self.dead():
                return False
            if time.monotonic() >= deadline:
                say(f"{what}; stopping")
                return False
            time.sleep(interval)
        return True

    def run(self) -> int:
        # From here on a signal means "stop": the loops notice it and return.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        status = 1
        try:
            status = self._run()
        finally:
            # Stopping can take up to 30 s (the worker's warm shutdown): a second Ctrl-C
            # cuts it short. One that had to be killed turns a success into a failure.
            self.stopping = True
            if not self.stop_all() and status == 0:
                status = 1
        return status

    def _run(self) -> int:
        for name in ("web", "worker", "webhooks", "beat"):
            self.start(name, services.command(name))

        def worker_answers() -> bool:
            ping = subprocess.run(
                services.worker_ping(), cwd=ROOT, capture_output=True, check=False
            )
            return ping.returncode == 0

        say("waiting for the worker to answer a ping")
        # Flower started before a worker answers shows no workers until it inspects again.
        if not self.wait_until(worker_answers, "the worker did not answer a ping within 60 s", 1):
            return self.leave()
        # Behind FLOWER_BASIC_AUTH; its /metrics and /healthcheck skip auth, so loopback
        # only on a developer's machine all the same.
        self.start("flower", services.command("flower", address="127.0.0.1"))
        for variable in ("PORT", "FLOWER_PORT"):
            port = int(os.environ[variable])
            if not self.wait_until(
                lambda port=port: port_open(port),
                f"nothing answers on 127.0.0.1:{port} after 60 s",
                0.5,
            ):
                return self.leave()

        port, flower_port = os.environ["PORT"], os.environ["FLOWER_PORT"]
        say(f"up — API    http://127.0.0.1:{port}")
        say(f"     docs   http://127.0.0.1:{port}/docs")
        user, password = os.environ["FLOWER_BASIC_AUTH"].split(":", 1)
        if self.flower_generated:
            say(f"     Flower http://127.0.0.1:{flower_port}  user {user}, password {password} "
                "(made for this run)")  # fmt: skip
        else:
            say(f"     Flower http://127.0.0.1:{flower_port}  (FLOWER_BASIC_AUTH)")
        say("Ctrl-C stops everything")
        while not self.stop_signal:
            if self.dead():
                return 1
            time.sleep(0.2)
        return self.leave()

    def leave(self) -> int:
        """A stop that was asked for is a success, anything else a failure."""
        if self.stop_signal:
            say(f"{self.stop_signal} received")
            return 0
        return 1

    def stop_all(self) -> bool:
        """SIGTERM to each, then SIGKILL to any still running after its bound. False if
        one had to be killed."""
        running = [p for p in self.processes if p.alive()]
        if running:
            names = " ".join(p.name for p in running)
            say(f"stopping {names} (Ctrl-C again to kill them at once)")
        for process in running:
            process.signal_group(signal.SIGCONT)
            process.signal(signal.SIGTERM)
        graceful = True
        started = time.monotonic()
        for process in running:
            timeout = STOP_TIMEOUT.get(process.name, 10.0)
            while process.wait(0.2) is None:
                if self.hurry:
                    say(f"killing {process.name}")
                    graceful = False
                    break
                if time.monotonic() - started >= timeout:
                    say(f"{process.name} did not stop within {timeout:.0f} s: killing it")
                    graceful = False
                    break
            process.kill()
        for process in self.processes:
            process.kill()  # whatever a server left behind in its group
        return graceful


def up(*, database: bool, redis: bool) -> int:
    """`./run.sh up`: the whole stack in the foreground. `database` / `redis`: whether a
    throwaway server may serve DATABASE_URL / REDIS_URL (see throwaway_servers)."""
    for variable in ("PORT", "FLOWER_PORT"):
        # Fail now rather than after the migrations, with a server retrying its bind.
        if port_open(int(os.environ[variable])):
            die(
                f"something already listens on 127.0.0.1:{os.environ[variable]}: stop it, "
                f"or choose another {variable}"
            )
    services.check_settings()
    generated = services.flower_auth()
    with throwaway_servers(database=database, redis=redis):
        migrate()
        RUN.mkdir(parents=True, exist_ok=True)
        os.environ["PYTHONUNBUFFERED"] = "1"  # logs reach the terminal as they are written
        return Up(generated).run()


@contextlib.contextmanager
def throwaway_servers(*, database: bool, redis: bool) -> Iterator[None]:
    """For up, test and migrate: where `database` (DATABASE_URL was unset) and nothing
    listens on REMIT_PG_PORT, a throwaway PostgreSQL is started in .run, and stopped again
    on leaving; the same for Redis with `redis` and REMIT_REDIS_PORT."""
    pg: servers.Postgres | None = None
    redis_server: servers.Redis | None = None
    try:
        pg_port = int(os.environ["REMIT_PG_PORT"])
        if database and not servers.port_open(pg_port):
            try:
                pg = servers.Postgres(
                    RUN / "pg", port=pg_port, socket_dir=RUN / "pg" / "sock", movable=False
                )
            except servers.ServerError:
                die(
                    f"PostgreSQL is not running on 127.0.0.1:{pg_port} and no initdb/pg_ctl "
                    "was found: install postgresql (apt-get install postgresql) or set "
                    "DATABASE_URL, or use docker compose"
                )
            if pg.needs_init():
                say(f"creating a throwaway PostgreSQL {pg.major} cluster in .run/pg (once)")
            try:
                pg.start()
            except servers.ServerError as error:
                die(str(error))
            say(
                f"started a throwaway PostgreSQL on 127.0.0.1:{pg_port} (data in .run/pg; "
                "stopped on exit)"
            )
        redis_port = int(os.environ["REMIT_REDIS_PORT"])
        if redis and not servers.port_open(redis_port):
            if shutil.which("redis-server") is None:
                die(
                    f"Redis is not running on 127.0.0.1:{redis_port} and no redis-server was "
                    "found: install redis (apt-get install redis-server) or set REDIS_URL, or "
                    "use docker compose"
                )
            redis_server = servers.Redis(RUN / "redis", port=redis_port)
            try:
                redis_server.start()
            except servers.ServerError as error:
                die(str(error))
            say(f"started a throwaway Redis on 127.0.0.1:{redis_port} (stopped on exit)")
        yield
    finally:
        # Stopping must not be cut short by another Ctrl-C: a server would outlive us.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        if redis_server is not None and redis_server.process is not None:
            say("stopping the throwaway Redis")
            redis_server.stop()
        # Started, or interrupted while starting: its postmaster.pid says it runs.
        if pg is not None and (pg.started or (pg.data / "postmaster.pid").exists()):
            pg.started = True
            say("stopping the throwaway PostgreSQL")
            try:
                pg.stop()
            except servers.ServerError as error:
                say(str(error))
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_child(argv: list[str]) -> tuple[int, str | None]:
    """Runs `argv` and waits for it; returns its status and the signal we got meanwhile.
    Ctrl-C reaches the child straight from the terminal (same process group); SIGTERM or
    SIGHUP sent to us is passed on as SIGINT, which Python programs, pytest with its
    teardown (dropping its test database) included, handle as a clean stop."""
    got: list[str] = []
    child = subprocess.Popen(argv, cwd=ROOT)

    def on_signal(signum: int, _frame: object) -> None:
        got.append(signal.Signals(signum).name)
        if signum != signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A child killed by a signal: the shell's convention, 128 + its number.
    return (128 - status if status < 0 else status), (got[0] if got else None)


def migrate() -> None:
    status, interrupted = run_child(services.command("migrate"))
    if interrupted:
        raise SystemExit(130)  # the traceback above says enough
    if status:
        die(f"migrations failed (python -m worker.cli migrate exited with {status})")
