"""The operator's command line: `python -m worker.cli COMMAND` (or `./run.sh cli COMMAND`).

`python -m worker.cli --help` lists the commands, `COMMAND --help` explains one.
The commands that need only the database live in common.cli; those here need the
worker's broker connection or its tasks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
from sqlalchemy import select

from common import backlog
from common import cli as common_cli
from common.cli import fail, print_json
from common.db import retrying, script_session
from common.doorbells import ring
from common.errors import RemitError
from common.ledger import requeue_failed
from common.limits import IDEMPOTENCY_KEY_RULE, is_idempotency_key
from common.models import Transfer, TransferStatus
from common.transfers import Accepted, submit_deposit
from worker.tasks import sweep


@click.group(
    "remit",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit status: 0 done, 1 failed (or the audit found violations), 2 bad input.",
)
def cli() -> None:
    """Operate Remit: deposits, failed transfers, the ledger audit, the schema."""


for _command in common_cli.COMMANDS:
    cli.add_command(_command)


def _idempotency_key(ctx: click.Context, param: click.Parameter, key: str | None) -> str | None:
    if key is not None and not is_idempotency_key(key):
        raise click.BadParameter(f"an Idempotency-Key has {IDEMPOTENCY_KEY_RULE}")
    return key


@cli.command(short_help="Queue a deposit into an account.")
@click.argument("account", type=int)
@click.argument("amount")
@click.option("--key", callback=_idempotency_key, help="An Idempotency-Key for the deposit.")
def deposit(account: int, amount: str, key: str | None) -> None:
    """Queue a deposit from the outside world into ACCOUNT.

    AMOUNT is a decimal string in major units, e.g. "100.00". Prints the transfer's
    id and status, and whether it was created or replayed (same --key).
    """

    def submit() -> Accepted:
        with script_session() as session, session.begin():
            return submit_deposit(session, account, amount, key)

    try:
        accepted = retrying(submit)
    except RemitError as error:
        fail(f"{error.code}: {error.detail}", 1)
    transfer = accepted.transfer
    if transfer.status == "pending":
        ring(transfer.currency, [transfer.id])
    print_json({"transfer_id": transfer.id, "status": transfer.status, "created": accepted.created})


@cli.command(short_help="Settle failed transfers again.")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-failed", is_flag=True, help="Requeue every failed transfer.")
def requeue(ids: tuple[int, ...], all_failed: bool) -> None:
    """Give failed transfers (IDS, or --all-failed) a fresh attempt budget and settle them."""
    wanted = list(ids)
    if all_failed:
        with script_session() as session:
            failed = select(Transfer.id).where(Transfer.status == TransferStatus.FAILED)
            wanted = list(session.scalars(failed))
    if not wanted:
        fail("name transfer ids, or --all-failed", 2)

    def requeue_wanted() -> list[tuple[int, str]]:
        with script_session() as session, session.begin():
            return requeue_failed(session, wanted)

    requeued = retrying(requeue_wanted)
    for currency in sorted({currency for _, currency in requeued}):
        ring(currency, [i for i, c in requeued if c == currency])
    skipped = sorted(set(wanted) - {i for i, _ in requeued})
    print_json({"requeued": [i for i, _ in requeued], "not_failed": skipped})


@cli.command("sweep", short_help="Ring now for lost doorbells and due retries.")
def sweep_now() -> None:
    """Ring now for lost doorbells and due failed transfers."""
    print_json({"rang": sweep.apply().get()})


@cli.command(short_help="Pending and failed transfers, queue depth.")
def stats() -> None:
    """Pending transfers per currency, failed transfers, the broker's queue depth."""
    with script_session() as session:
        pending = backlog.pending_by_currency(session)
        failed = backlog.failed_count(session)
    queue_depth = backlog.queue_depth()
    print_json(
        {
            "pending": {
                row.currency: {"count": row.count, "oldest_seconds": round(row.oldest_s, 3)}
                for row in pending
            },
            "failed": failed,
            "queue_depth": queue_depth,
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on argv (default: the command line) and return its exit status."""
    return common_cli.run(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
