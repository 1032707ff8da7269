"""The units of work and row types of common.db's rule (docs/decisions/0028)."""

from __future__ import annotations

from common import db
from common.transfers import TRANSFERS, TransferRow


def test_one_unit_of_work_per_use() -> None:
    # A new way to get a handle belongs in the rule (common/db.py's docstring) first.
    helpers = {
        name
        for name in vars(db)
        if not name.startswith("_") and name.endswith(("_session", "_statements", "_transaction"))
    }
    assert helpers == {
        "request_statements",
        "request_session",
        "request_transaction",
        "settlement_transaction",
        "script_session",
    }


def test_a_transfer_row_has_every_column_of_transfers() -> None:
    # The statements select TransferRow's fields; a column missing here is never read.
    assert set(TransferRow._fields) == set(TRANSFERS.c.keys())
