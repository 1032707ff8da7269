"""`python -m ops COMMAND`: what ./run.sh runs once .venv is ready (`./run.sh help`).

Exit status: 0 when the command succeeded (for up: stopped on request, every process
cleanly); pytest's own status for test (5, no tests collected, counts as a failure); 2
for a usage error or a configuration the services refuse; 130 / 143 when interrupted
(SIGINT / SIGTERM) while still preparing; 1 for anything else (a process of up died on
its own or had to be killed, a server could not be started, migrations failed...).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import NoReturn

import click

from ops import ROOT, die, say, services

# Commands that hand their arguments over as they are (pytest's, the bench's...).
PASS_THROUGH = {
    "context_settings": {"ignore_unknown_options": True, "allow_interspersed_args": False},
    "add_help_option": False,
}
# Whether DATABASE_URL / REDIS_URL were unset (ours to serve with a throwaway server).
DEFAULTS: dict[str, bool] = {}


def _interrupted(signum: int, _frame: object) -> NoReturn:
    # While preparing, a signal just ends the command; `finally` blocks stop what it
    # started (the throwaway servers).
    raise SystemExit(128 + signum)


def _exec(argv: list[str]) -> NoReturn:
    """Becomes `argv`: a container's SIGTERM then reaches the service directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(ROOT)
    # Python ignores SIGPIPE, and an ignored signal stays ignored across exec.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execvp(argv[0], argv)


@click.group(invoke_without_command=True)
@click.pass_context
def main(context: click.Context) -> None:
    """Remit's processes: the stack, one service, the tests, the benchmark."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    database, redis = services.set_defaults()
    DEFAULTS.update(database=database, redis=redis)
    if context.invoked_subcommand is None:
        context.invoke(up)


@main.command()
def up() -> None:
    """Run the whole stack in the foreground: migrate, then web, workers, beat, Flower."""
    from ops import supervisor

    raise SystemExit(supervisor.up(**DEFAULTS))


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def test(args: tuple[str, ...]) -> None:
    """Run the test suite: pytest ARGS (each run creates and drops its own database).

    With no test path among ARGS (the whole suite), the tests run in parallel processes
    (pytest-xdist: tests/conftest.py keeps the fault suites and the tools' smoke runs
    in one of them, docs/decisions/0047), and mypy checks the types of common, web and
    worker meanwhile; either failing fails the run.
    """
    from ops import supervisor

    whole_suite = not any(os.path.exists(arg) for arg in args)
    types = _start_type_check() if whole_suite else None
    if whole_suite and not any(arg.startswith(("-n", "--numprocesses", "-p")) for arg in args):
        args = (*_PARALLEL, *args)
    with supervisor.throwaway_servers(**DEFAULTS):
        status, _ = supervisor.run_child([sys.executable, "-m", "pytest", *args])
    if status == 5:
        say("pytest collected no tests: that is a failure")
    if types is not None:
        output, _ = types.communicate()
        print(output, end="", flush=True)
        if types.returncode and not status:
            status = 1
    raise SystemExit(status)


# Two processes, or one per core up to four; the scopes in the order collected, so the
# heavy one (first, tests/chaos) starts at once.
_PARALLEL = ("-n", str(min(4, max(2, os.cpu_count() or 1))), "--no-loadscope-reorder")


def _start_type_check() -> subprocess.Popen[str]:
    # The configuration (modules, strictness) is pyproject.toml's [tool.mypy].
    return subprocess.Popen(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@main.command()
def migrate() -> None:
    """Create the database if missing, apply the migrations and seed it, then exit."""
    from ops import supervisor

    services.check_settings()
    with supervisor.throwaway_servers(database=DEFAULTS["database"], redis=False):
        supervisor.migrate()


def _service(name: str) -> None:
    """One service in the foreground, as its docker compose service runs it; no throwaway
    servers, nothing to clean up."""
    services.check_settings()
    if name == "flower" and services.flower_auth():
        user, password = os.environ["FLOWER_BASIC_AUTH"].split(":", 1)
        say(f"Flower login for this run: {user} / {password}")
    _exec(services.command(name))


for _name, _help in (
    ("web", "Run only the API (gunicorn) in the foreground."),
    ("worker", "Run only a settlement worker (Celery) in the foreground."),
    ("webhooks", "Run only the webhook delivery worker (Celery, threads) in the foreground."),
    ("beat", "Run only the scheduler (Celery beat) in the foreground."),
    ("flower", "Run only Flower in the foreground, behind FLOWER_BASIC_AUTH."),
):
    main.command(name=_name, help=_help)(lambda _name=_name: _service(_name))


@main.command()
def pgbouncer() -> None:
    """Run PgBouncer (transaction pooling) in front of DATABASE_URL's PostgreSQL, in the
    foreground: what its compose service and Kubernetes Deployment run (ops/pgbouncer.py)."""
    from ops import pgbouncer as pooler

    _exec(pooler.prepare())


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark the real stack on its own throwaway servers (bench/README.md)."""
    from ops import debian, supervisor

    if "python" not in args and not {"-h", "--help"} & set(args):
        # wrk drives phase c when installed; without it the bench falls back to aiohttp.
        debian.ensure("wrk")
    # It starts and stops its own servers; SIGTERM reaches it as SIGINT, its clean stop.
    status, _ = supervisor.run_child([sys.executable, "-m", "bench", *args])
    raise SystemExit(status)


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def soak(args: tuple[str, ...]) -> None:
    """Run the real stack at half its capacity for --minutes (30) on throwaway servers."""
    from ops import supervisor

    # As the bench: its own servers, stopped on SIGINT (SIGTERM reaches it as SIGINT).
    status, _ = supervisor.run_child([sys.executable, "-m", "bench.soak", *args])
    raise SystemExit(status)


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def docker(args: tuple[str, ...]) -> None:
    """The stack under Docker Compose: docker compose up --build ARGS."""
    if shutil.which("docker") is None:
        die("docker is not installed: use ./run.sh, or install Docker")
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        die("no Docker engine answers here: use ./run.sh instead")
    if not (ROOT / ".env").is_file():
        die("no .env: copy .env.example to .env and set its secrets first")
    _exec(["docker", "compose", "up", "--build", *args])


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def cli(args: tuple[str, ...]) -> None:
    """The operator CLI (python -m worker.cli); it never starts throwaway servers."""
    _exec([sys.executable, "-m", "worker.cli", *args])


@main.command(**PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def audit(args: tuple[str, ...]) -> None:
    """Check every ledger invariant of the database; exit 1 on any violation."""
    _exec([sys.executable, "-m", "worker.cli", "audit", *args])


if __name__ == "__main__":
    main(prog_name="./run.sh")
