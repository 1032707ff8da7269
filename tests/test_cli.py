"""The operator CLI, run in-process against the real database, broker and worker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import text

from common.audit import audit
from common.db import script_session
from tests.conftest import SUPERUSER, SUPERUSER_PASSWORD, Api, basic_auth, settlement_held
from worker.cli import main


def _run(capsys: Any, *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_deposit_queues_and_settles(api: Api, capsys: Any) -> None:
    member = api.register()
    code, out = _run(capsys, "deposit", str(member.accounts["EUR"]), "12.34", "--key", "cli-1")
    assert code == 0
    assert out["created"] is True
    assert api.wait_final(SUPERUSER, out["transfer_id"])["status"] == "settled"
    assert api.balance(member, member.accounts["EUR"]) == "12.34"
    code, again = _run(capsys, "deposit", str(member.accounts["EUR"]), "12.34", "--key", "cli-1")
    assert again == {**out, "created": False, "status": "settled"}


def test_deposit_refuses_bad_input(api: Api, capsys: Any) -> None:
    assert main(["deposit", "999999999", "1.00"]) == 1
    member = api.register()
    assert main(["deposit", str(member.accounts["USD"]), "1.001"]) == 1
    assert "invalid_amount" in capsys.readouterr().err


def test_requeue_settles_a_failed_transfer(api: Api, capsys: Any) -> None:
    alice, bob = api.funded("10.00"), api.register()
    with settlement_held("USD"):
        body = api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "1.00").get_json()
        with script_session() as session, session.begin():
            # As the settler leaves a transfer after its last failed attempt.
            session.execute(
                text(
                    "UPDATE transfers SET status = 'failed', reason = 'settlement_error', "
                    "attempts = 5, next_attempt_at = now() + interval '1 hour' WHERE id = :id"
                ),
                {"id": body["id"]},
            )
            # Alice's deposit, settled: not failed, left alone.
            settled = session.scalar(
                text("SELECT id FROM transfers WHERE to_account_id = :id AND status = 'settled'"),
                {"id": alice.accounts["USD"]},
            )
    code, out = _run(capsys, "requeue", str(body["id"]), str(settled))
    assert code == 0
    assert out == {"requeued": [body["id"]], "not_failed": [settled]}
    assert api.wait_final(alice, body["id"])["status"] == "settled"


def test_requeue_needs_ids(capsys: Any) -> None:
    assert main(["requeue"]) == 2


def test_audit_passes_on_a_sound_ledger(api: Api, capsys: Any) -> None:
    api.funded("5.00")
    assert main(["audit"]) == 0
    assert "consistent" in capsys.readouterr().err


def test_audit_names_each_violation() -> None:
    with script_session() as session, session.begin():
        # Corrupt inside a transaction that is rolled back: the check sees it, nobody else does.
        session.execute(text("UPDATE accounts SET balance = balance + 1 WHERE id = 5"))
        violations = audit(session)
        session.rollback()
    assert any("sum of balances is not zero" in line for line in violations)
    assert any(
        "differs from the sum of its postings" in line and "(5," in line for line in violations
    )


def test_stats_and_sweep(api: Api, capsys: Any) -> None:
    code, stats = _run(capsys, "stats")
    assert code == 0
    assert set(stats) == {"pending", "failed", "queue_depth"}
    code, swept = _run(capsys, "sweep")
    assert code == 0
    assert isinstance(swept["rang"], dict)


def test_set_superuser_password(api: Api, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new password\n"))
    try:
        assert main(["set-superuser-password", "--password-stdin"]) == 0
        assert api.client.get("/users/1/accounts", headers=SUPERUSER.auth).status_code == 401
        new = basic_auth("superuser", "a brand new password")
        assert api.client.get("/users/1/accounts", headers=new).status_code == 200
    finally:
        monkeypatch.setattr("sys.stdin", io.StringIO(SUPERUSER_PASSWORD + "\n"))
        assert main(["set-superuser-password", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["set-superuser-password", "--password-stdin"]) == 2


def test_help_lists_every_command(capsys: Any) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: remit [OPTIONS] COMMAND [ARGS]...")
    for command in (
        "audit",
        "check-config",
        "deposit",
        "migrate",
        "requeue",
        "set-superuser-password",
        "stats",
        "sweep",
    ):
        assert f"  {command} " in out
    assert main(["deposit", "-h"]) == 0
    assert "Usage: remit deposit [OPTIONS] ACCOUNT AMOUNT" in capsys.readouterr().out


def test_usage_errors_exit_2_with_the_usage(capsys: Any) -> None:
    assert main(["deposit", "not-an-id", "1.00"]) == 2
    err = capsys.readouterr().err
    assert "Usage: remit deposit" in err
    assert "'not-an-id' is not a valid integer" in err
    assert main(["deposit", "1", "1.00", "--key", "é"]) == 2
    assert "Idempotency-Key" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert "No such command 'no-such-command'" in capsys.readouterr().err


def test_check_config(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["check-config"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SETTLE_BATCH_SIZE", "many")
    assert main(["check-config"]) == 2
    assert capsys.readouterr().err == "remit: SETTLE_BATCH_SIZE must be an integer, got 'many'\n"


def test_migrate_is_idempotent(capsys: Any) -> None:
    assert main(["migrate"]) == 0
    # Alembic logs its own lines first.
    assert capsys.readouterr().err.endswith("remit: database migrated and seeded\n")


@pytest.mark.parametrize(
    ("command", "status", "err"),
    [
        ("check-config", 2, "remit: SETTLE_BATCH_SIZE must be an integer, got 'many'\n"),
        ("audit", 0, "audit: ledger is consistent\n"),
    ],
)
def test_the_module_runs_the_cli(command: str, status: int, err: str) -> None:
    env = dict(os.environ)
    if command == "check-config":
        env["SETTLE_BATCH_SIZE"] = "many"
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (status, err)
