"""The settlement engine's holds, captures and refunds, driven below the API.

Holds, void requests and captures are written here as the web writes them
(docs/decisions/0036), so these tests check the settler's statements on their own:
reservations, releases, captures, expiry by beat, refund totals, their events, and the
audit after each.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from common.audit import audit
from common.db import script_session
from common.ledger import currencies_due, settle_batch
from tests.conftest import Api, Member, sweep_until
from worker.tasks import settle, sweep


def fetch_one(sql: str, **params: Any) -> Any:
    with script_session() as session, session.begin():
        return session.execute(text(sql), params).one()


def execute(sql: str, **params: Any) -> Any:
    """Run one statement; its first value when it returns rows."""
    with script_session() as session, session.begin():
        result = session.execute(text(sql), params)
        return result.scalar() if result.returns_rows else None


def make_hold(payer: Member, payee: Member, amount: int, commission: int = 0, **extra: Any) -> int:
    """A pending USD hold (minor units), as POST /users/{id}/holds records it."""
    return execute(
        "INSERT INTO holds (from_account_id, to_account_id, from_user_id, to_user_id, currency,"
        " amount, commission, requested_by, expires_at)"
        " VALUES (:source, :target, :payer, :payee, 'USD', :amount, :commission, :payer,"
        " now() + make_interval(secs => :expires_in)) RETURNING id",
        source=payer.accounts["USD"],
        target=payee.accounts["USD"],
        payer=payer.id,
        payee=payee.id,
        amount=amount,
        commission=commission,
        expires_in=extra.get("expires_in", 3600),
    )


def request_capture(hold_id: int, amount: int, commission: int) -> int | None:
    """A capture transfer and the hold's transfer_id, as the capture route writes them;
    None when the hold is not held with nothing asked of it."""
    with script_session() as session, session.begin():
        hold = session.execute(
            text("SELECT * FROM holds WHERE id = :id FOR NO KEY UPDATE"), {"id": hold_id}
        ).one()
        if hold.status != "held" or hold.transfer_id or hold.void_requested_at:
            return None
        amount = min(amount, hold.amount)
        transfer_id = session.scalar(
            text(
                "INSERT INTO transfers (kind, hold_id, from_account_id, to_account_id,"
                " from_user_id, to_user_id, currency, amount, commission, requested_by)"
                " VALUES ('capture', :hold, :source, :target, :payer, :payee, 'USD', :amount,"
                " :commission, :payer) RETURNING id"
            ),
            {
                "hold": hold_id,
                "source": hold.from_account_id,
                "target": hold.to_account_id,
                "payer": hold.from_user_id,
                "payee": hold.to_user_id,
                "amount": amount,
                "commission": commission,
            },
        )
        session.execute(
            text("UPDATE holds SET transfer_id = :t WHERE id = :id"),
            {"t": transfer_id, "id": hold_id},
        )
    return transfer_id


def settle_usd(timeout_s: float = 20) -> None:
    """Settle USD here until nothing of it is due. Our settle returns at once when this
    process's worker holds the USD lock, leaving the work to it: then wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        settle.apply(args=("USD",))
        with script_session() as session, session.begin():
            if "USD" not in currencies_due(session, 0):
                return
        assert time.monotonic() < deadline, "USD work still due"
        time.sleep(0.05)


def hold_row(hold_id: int) -> Any:
    return fetch_one("SELECT * FROM holds WHERE id = :id", id=hold_id)


def account(member: Member) -> tuple[int, int]:
    row = fetch_one("SELECT balance, held FROM accounts WHERE id = :id", id=member.accounts["USD"])
    return row.balance, row.held


def hold_events(hold_id: int) -> list[str]:
    with script_session() as session, session.begin():
        return list(
            session.scalars(
                text("SELECT type FROM events WHERE hold_id = :id ORDER BY id"), {"id": hold_id}
            )
        )


def assert_audit_clean() -> None:
    with script_session() as session, session.begin():
        assert audit(session) == []


def test_a_hold_reserves_then_a_void_releases_it(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    hold_id = make_hold(alice, bob, 600, 6)
    settle_usd()
    assert hold_row(hold_id).status == "held"
    assert account(alice) == (1000, 606)
    # Held money cannot be spent, though the balance would cover it.
    refused = api.wait_final(
        alice,
        api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "4.00").get_json()["id"],
    )
    assert (refused["status"], refused["reason"]) == ("rejected", "insufficient_funds")
    execute("UPDATE holds SET void_requested_at = now() WHERE id = :id", id=hold_id)
    settle_usd()
    assert hold_row(hold_id).status == "voided"
    assert account(alice) == (1000, 0)
    assert hold_events(hold_id) == ["hold.held", "hold.voided"]
    assert_audit_clean()


def test_a_hold_the_payer_cannot_cover_is_rejected(api: Api) -> None:
    alice, bob = api.funded("1.00"), api.register()
    hold_id = make_hold(alice, bob, 100, 1)
    settle_usd()
    row = hold_row(hold_id)
    assert (row.status, row.reason) == ("rejected", "insufficient_funds")
    assert account(alice) == (100, 0)
    assert hold_events(hold_id) == ["hold.rejected"]


def test_a_partial_capture_spends_the_reservation_and_releases_the_rest(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    hold_id = make_hold(alice, bob, 1000, 0)
    settle_usd()
    assert account(alice) == (1000, 1000)
    capture_id = request_capture(hold_id, 400, 4)
    settle_usd()
    row = hold_row(hold_id)
    assert (row.status, row.captured_amount, row.transfer_id) == ("captured", 400, capture_id)
    assert account(alice) == (596, 0)
    assert account(bob) == (400, 0)
    transfer = fetch_one("SELECT status FROM transfers WHERE id = :id", id=capture_id)
    assert transfer.status == "settled"
    assert hold_events(hold_id) == ["hold.held", "hold.captured"]
    assert_audit_clean()


def test_expired_holds_are_released_once_however_many_beats_run(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    hold_ids = [make_hold(alice, bob, 100) for _ in range(5)]
    settle_usd()
    assert account(alice) == (1000, 500)
    execute(
        "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = ANY(:ids)",
        ids=hold_ids,
    )
    # Two beats (and their doorbells) at once, several times over.
    beats = [threading.Thread(target=lambda: [sweep.apply() for _ in range(3)]) for _ in range(2)]
    for beat in beats:
        beat.start()
    for beat in beats:
        beat.join()
    # The doorbells they rang may still be settling in this process's worker.
    settle_usd()
    assert [hold_row(i).status for i in hold_ids] == ["expired"] * 5
    assert account(alice) == (1000, 0)
    for hold_id in hold_ids:
        assert hold_events(hold_id) == ["hold.held", "hold.expired"]
    assert_audit_clean()


def test_a_hold_with_a_capture_asked_for_does_not_expire(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    hold_id = make_hold(alice, bob, 300)
    settle_usd()
    # The settler is busy elsewhere while the capture is asked for and the hold expires.
    capture_id = request_capture(hold_id, 300, 0)
    execute("UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = :id", id=hold_id)
    settle_usd()
    assert hold_row(hold_id).status == "captured"
    assert (
        fetch_one("SELECT status FROM transfers WHERE id = :id", id=capture_id).status == "settled"
    )
    assert account(bob) == (300, 0)
    assert_audit_clean()


def test_settled_refunds_add_up_and_rejected_ones_give_their_room_back(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    original = api.wait_final(
        alice,
        api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "5.00").get_json()["id"],
    )
    assert original["status"] == "settled"
    # Bob spends 2.00 of it: a refund of 4.00 then cannot be covered.
    spent = api.transfer(bob, bob.accounts["USD"], alice.accounts["USD"], "2.00").get_json()["id"]
    assert api.wait_final(bob, spent)["status"] == "settled"

    def refund(amount: int) -> int:
        execute(
            "UPDATE transfers SET refunds_claimed = refunds_claimed + :a WHERE id = :id",
            a=amount,
            id=original["id"],
        )
        return execute(
            "INSERT INTO transfers (kind, refund_of, from_account_id, to_account_id,"
            " from_user_id, to_user_id, currency, amount, commission, requested_by)"
            " VALUES ('refund', :orig, :source, :target, :payee, :payer, 'USD', :a, 0, :payee)"
            " RETURNING id",
            orig=original["id"],
            source=bob.accounts["USD"],
            target=alice.accounts["USD"],
            payee=bob.id,
            payer=alice.id,
            a=amount,
        )

    settled, refused = refund(100), refund(400)
    settle_usd()
    statuses = {
        i: fetch_one("SELECT status FROM transfers WHERE id = :id", id=i).status
        for i in (settled, refused)
    }
    assert statuses == {settled: "settled", refused: "rejected"}
    row = fetch_one(
        "SELECT refunded, refunds_claimed FROM transfers WHERE id = :id", id=original["id"]
    )
    assert (row.refunded, row.refunds_claimed) == (100, 100)
    assert_audit_clean()


def try_void(hold_id: int) -> bool:
    """The void route's statement."""
    return bool(
        execute(
            "UPDATE holds SET void_requested_at = now() WHERE id = :id"
            " AND status IN ('pending', 'held') AND transfer_id IS NULL"
            " AND void_requested_at IS NULL RETURNING id",
            id=hold_id,
        )
    )


def test_holds_captures_voids_and_transfers_at_once_never_overdraw(api: Api) -> None:
    alice, bob = api.funded("20.00"), api.register()
    rng = random.Random(16)
    hold_ids: list[int] = []
    errors: list[BaseException] = []

    def guarded(work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as error:  # reported by the test below
                errors.append(error)

        return run

    holds_made = threading.Event()

    def make_holds() -> None:
        for _ in range(40):
            hold_ids.append(make_hold(alice, bob, rng.randint(50, 400)))
        holds_made.set()

    def transfers() -> None:
        for _ in range(30):
            api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "0.75")

    def settler() -> None:
        while not holds_made.is_set():
            settle_usd()
        for _ in range(20):
            settle_usd()

    def capture_and_void() -> None:
        # While holds are being made, and as long again after: captures and voids meet
        # pending holds, held ones, and the settler applying earlier requests.
        done = 0
        while done < 150:
            done += holds_made.is_set()
            time.sleep(0.001)
            if hold_ids:
                hold_id = rng.choice(hold_ids)
                if rng.random() < 0.5:
                    request_capture(hold_id, rng.randint(1, 400), 0)
                else:
                    try_void(hold_id)

    workers = [
        threading.Thread(target=guarded(work))
        for work in (make_holds, transfers, settler, settler, capture_and_void, capture_and_void)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    sweep_until(
        lambda: (
            execute(
                "SELECT count(*) FROM holds WHERE id = ANY(:ids) AND (status = 'pending' OR"
                " (status = 'held' AND (void_requested_at IS NOT NULL"
                " OR transfer_id IS NOT NULL)))",
                ids=hold_ids,
            )
            == 0
            and execute(
                "SELECT count(*) FROM transfers WHERE status = 'pending' AND from_user_id = :id",
                id=alice.id,
            )
            == 0
        )
    )
    assert_audit_clean()
    balance, held = account(alice)
    assert 0 <= held <= balance
    statuses = {hold_row(i).status for i in hold_ids}
    assert statuses <= {"held", "rejected", "captured", "voided"}
    assert {"captured", "voided"} <= statuses


def test_an_expiry_rolled_back_mid_batch_is_made_once_by_the_next_beat(api: Api) -> None:
    """A settler that dies between expiring holds and its COMMIT leaves them held, and
    the next beat expires each of them once."""
    alice, bob = api.funded("10.00"), api.register()
    hold_ids = [make_hold(alice, bob, 200) for _ in range(3)]
    settle_usd()
    execute(
        "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = ANY(:ids)",
        ids=hold_ids,
    )
    usd = fetch_one("SELECT commission_account_id FROM currencies WHERE code = 'USD'")
    with script_session() as session:
        result = settle_batch(session, "USD", 100, usd.commission_account_id)
        assert {d.hold_id for d in result.hold_decisions} == set(hold_ids)
        session.rollback()  # the crash: nothing of the batch commits
    assert [hold_row(i).status for i in hold_ids] == ["held"] * 3
    assert account(alice) == (1000, 600)
    sweep_until(lambda: all(hold_row(i).status == "expired" for i in hold_ids))
    sweep.apply()
    assert account(alice) == (1000, 0)
    for hold_id in hold_ids:
        assert hold_events(hold_id) == ["hold.held", "hold.expired"]
    assert_audit_clean()


def events_of(user: Member, *, transfer: int | None = None, hold: int | None = None) -> list[str]:
    """The user's events of one transfer or one hold (their ids are of two sequences)."""
    with script_session() as session, session.begin():
        return list(
            session.scalars(
                text(
                    "SELECT type FROM events WHERE user_id = :user"
                    " AND transfer_id IS NOT DISTINCT FROM :transfer"
                    " AND hold_id IS NOT DISTINCT FROM :hold ORDER BY id"
                ),
                {"user": user.id, "transfer": transfer, "hold": hold},
            )
        )


def test_refunds_and_captures_tell_payer_and_payee_in_their_transaction(api: Api) -> None:
    alice, bob = api.funded("10.00"), api.register()
    original = api.wait_final(
        alice,
        api.transfer(alice, alice.accounts["USD"], bob.accounts["USD"], "5.00").get_json()["id"],
    )
    response = api.client.post(
        f"/users/{bob.id}/transfers/{original['id']}/refunds",
        data={"amount": "2.00"},
        headers=bob.auth,
    )
    assert response.status_code == 202, response.get_json()
    refund = api.wait_final(bob, response.get_json()["id"])
    assert refund["status"] == "settled"
    assert events_of(bob, transfer=refund["id"]) == ["transfer.settled"]
    assert events_of(alice, transfer=refund["id"]) == ["transfer.received"]

    hold_id = make_hold(alice, bob, 100)
    settle_usd()
    capture_id = request_capture(hold_id, 100, 0)
    assert capture_id is not None
    settle_usd()
    assert events_of(alice, transfer=capture_id) == ["transfer.settled"]
    assert events_of(bob, transfer=capture_id) == ["transfer.received"]
    assert events_of(alice, hold=hold_id) == ["hold.held", "hold.captured"]
    assert events_of(bob, hold=hold_id) == []
