"""The operator commands that need only the database and the settings.

They are commands of the one operator CLI, `python -m worker.cli` (`./run.sh cli`), which
adds the commands that need the worker. Messages go to standard error,
results to standard output; exit status 1 means a failed check, 2 bad input or
configuration.

The commands import the database and migration modules when they run: check-config
runs before every service starts, and loading them costs it over a second of CPU.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from common.limits import PASSWORD_RULE, is_password_length
from common.settings import ConfigurationError, get_settings, load_settings


def say(message: str) -> None:
    """One line for the operator, on standard error."""
    click.echo(f"remit: {message}", err=True)


def print_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def fail(message: str, status: int) -> NoReturn:
    say(message)
    click.get_current_context().exit(status)


@click.command("migrate", short_help="Create or upgrade the database, apply the seed.")
def migrate() -> None:
    """Create the database if needed, upgrade the schema, apply the seed.

    Idempotent: run it on every deploy.
    """
    from common.migrate import migrate as run_migrations  # noqa: PLC0415 - see the module docstring

    try:
        run_migrations()
    except ConfigurationError as error:
        fail(str(error), 2)
    say("database migrated and seeded")


@click.command("check-config", short_help="Check the configuration (silent when fine).")
def check_config() -> None:
    """Check the configuration, as run.sh does before starting a service.

    Prints nothing when it is fine; one line (and exit status 2) when it is not.
    """
    try:
        load_settings()
    except ConfigurationError as error:
        fail(str(error), 2)


@click.command("set-superuser-password", short_help="Apply SUPERUSER_PASSWORD (or prompt for one).")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input's first line."
)
def set_superuser_password(password_stdin: bool) -> None:
    """Apply SUPERUSER_PASSWORD (or a prompted one) to the superuser."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = get_settings().superuser_password or getpass.getpass("new password: ")
    if not is_password_length(password):
        fail(f"the password must have {PASSWORD_RULE}", 2)
    from common.migrate import set_superuser_password as apply  # noqa: PLC0415

    apply(get_settings().database_url, password)
    say("superuser password set")


@click.command("audit", short_help="Check the ledger invariants.")
def audit() -> None:
    """Check every ledger invariant; print each violation and exit 1 on any."""
    from common.audit import audit as check  # noqa: PLC0415
    from common.db import script_session  # noqa: PLC0415

    # REPEATABLE READ: all checks see one snapshot even while settlements commit.
    with script_session() as session, session.begin():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        violations = check(session)
    for line in violations:
        click.echo(line)
    if violations:
        click.echo(f"audit: {len(violations)} violation(s)", err=True)
        click.get_current_context().exit(1)
    click.echo("audit: ledger is consistent", err=True)


COMMANDS = (migrate, check_config, set_superuser_password, audit)


def run(command: click.Command, argv: Sequence[str] | None = None, prog_name: str = "remit") -> int:
    """Run a command (or the CLI's group) and return its exit status instead of exiting."""
    try:
        result = command.main(
            args=list(argv) if argv is not None else None,
            prog_name=prog_name,
            standalone_mode=False,
        )
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return result if isinstance(result, int) else 0
