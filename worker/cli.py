"""The operator's command line: `python -m worker.cli COMMAND` (or `./run.sh cli COMMAND`).

set-superuser-password   apply SUPERUSER_PASSWORD (or a prompted one) to the superuser
deposit ACCOUNT AMOUNT   queue a deposit from the outside world into ACCOUNT
requeue [ID ...]         give failed transfers a fresh attempt budget and settle them
audit                    check every ledger invariant; exit 1 on any violation
sweep                    ring now for lost doorbells and due failed transfers
stats                    pending/failed transfers and the broker's queue depth
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence

from sqlalchemy import text

from common import audit as ledger_audit
from common.db import in_transaction, new_session
from common.errors import RemitError
from common.ledger import requeue_failed
from common.migrate import set_superuser_password
from common.settings import get_settings
from common.transfers import submit_deposit
from worker.app import app
from worker.tasks import ring, sweep


def _print(payload: object) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_set_superuser_password(args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = get_settings().superuser_password or getpass.getpass("new password: ")
    if not 8 <= len(password) <= 1024:
        print("remit: the password must have 8 to 1024 characters", file=sys.stderr)
        return 2
    set_superuser_password(get_settings().database_url, password)
    print("remit: superuser password set", file=sys.stderr)
    return 0


def cmd_deposit(args: argparse.Namespace) -> int:
    try:
        accepted = in_transaction(
            lambda session: submit_deposit(session, args.account, args.amount, args.key)
        )
    except RemitError as error:
        print(f"remit: {error.code}: {error.detail}", file=sys.stderr)
        return 1
    transfer = accepted.transfer
    if transfer.status == "pending":
        ring(transfer.currency, [transfer.id])
    _print({"transfer_id": transfer.id, "status": transfer.status, "created": accepted.created})
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    ids = args.ids
    if args.all_failed:
        with new_session() as session:
            ids = list(session.scalars(text("SELECT id FROM transfers WHERE status = 'failed'")))
    if not ids:
        print("remit: name transfer ids, or --all-failed", file=sys.stderr)
        return 2
    requeued = in_transaction(lambda session: requeue_failed(session, ids))
    for currency in sorted({currency for _, currency in requeued}):
        ring(currency, [i for i, c in requeued if c == currency])
    skipped = sorted(set(ids) - {i for i, _ in requeued})
    _print({"requeued": [i for i, _ in requeued], "not_failed": skipped})
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    return ledger_audit.main()


def cmd_sweep(args: argparse.Namespace) -> int:
    _print({"rang": sweep.apply().get()})
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with new_session() as session:
        pending = session.execute(
            text(
                "SELECT currency, count(*) AS pending, "
                "extract(epoch FROM clock_timestamp() - min(created_at)) AS oldest_s "
                "FROM transfers WHERE status = 'pending' GROUP BY currency ORDER BY currency"
            )
        ).all()
        failed = session.scalar(text("SELECT count(*) FROM transfers WHERE status = 'failed'"))
    with app.connection_for_write() as connection:
        queue_depth = connection.default_channel.client.llen(app.conf.task_default_queue)
    _print(
        {
            "pending": {
                row.currency: {"count": row.pending, "oldest_seconds": round(row.oldest_s, 3)}
                for row in pending
            },
            "failed": failed,
            "queue_depth": queue_depth,
        }
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remit", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    password = commands.add_parser(
        "set-superuser-password", help="apply SUPERUSER_PASSWORD (or prompt for one)"
    )
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    deposit = commands.add_parser("deposit", help="queue a deposit into an account")
    deposit.add_argument("account", type=int)
    deposit.add_argument("amount", help='decimal string in major units, e.g. "100.00"')
    deposit.add_argument("--key", help="an Idempotency-Key for the deposit")
    requeue = commands.add_parser("requeue", help="settle failed transfers again")
    requeue.add_argument("ids", nargs="*", type=int)
    requeue.add_argument("--all-failed", action="store_true")
    commands.add_parser("audit", help="check the ledger invariants")
    commands.add_parser("sweep", help="ring for lost doorbells and due failed transfers now")
    commands.add_parser("stats", help="pending and failed transfers, queue depth")
    return parser


HANDLERS = {
    "set-superuser-password": cmd_set_superuser_password,
    "deposit": cmd_deposit,
    "requeue": cmd_requeue,
    "audit": cmd_audit,
    "sweep": cmd_sweep,
    "stats": cmd_stats,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
