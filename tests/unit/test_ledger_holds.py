"""The pure settlement rules for holds, captures and refunds (common.ledger.plan_batch).

Examples first, then a property against a naive oracle written here: operations one at
a time, releases first, then reservations and transfers in the order they were made.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from common.ledger import (
    HOLD_NOT_ACTIVE,
    INSUFFICIENT_FUNDS,
    AccountState,
    HoldDecision,
    PendingHold,
    PendingTransfer,
    plan_batch,
)
from common.models import AccountKind, HoldStatus, TransferKind, TransferStatus
from tests.properties import examples

EXT, FEE, ALICE, BOB = 1, 2, 10, 11
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def accounts(alice: int, alice_held: int = 0, bob: int = 0) -> dict[int, AccountState]:
    return {
        EXT: AccountState(EXT, AccountKind.EXTERNAL, -(alice + bob)),
        FEE: AccountState(FEE, AccountKind.COMMISSION, 0),
        ALICE: AccountState(ALICE, AccountKind.USER, alice, alice_held),
        BOB: AccountState(BOB, AccountKind.USER, bob),
    }


def hold(hold_id: int, reserve: int, **fields: object) -> PendingHold:
    values: dict = {"status": HoldStatus.PENDING, "created_at": at(hold_id), **fields}
    return PendingHold(hold_id, values.pop("status"), ALICE, reserve, **values)


def test_a_hold_reserves_what_it_can_and_refuses_what_it_cannot() -> None:
    plan = plan_batch([], accounts(100), FEE, [hold(1, 60), hold(2, 60), hold(3, 40)])
    assert plan.holds == [
        HoldDecision(1, HoldStatus.HELD),
        HoldDecision(2, HoldStatus.REJECTED, INSUFFICIENT_FUNDS),
        HoldDecision(3, HoldStatus.HELD),
    ]
    assert plan.held == {ALICE: 100}
    assert plan.balances == {}
    assert plan.postings == []


def test_a_transfer_cannot_spend_what_is_held() -> None:
    # Balance 100, 70 held: a transfer of 40 would be covered by the balance, not by
    # what is available.
    transfer = PendingTransfer(5, ALICE, BOB, 40, 0, created_at=at(5))
    plan = plan_batch([transfer], accounts(100, alice_held=70), FEE)
    assert plan.decisions[0].status == TransferStatus.REJECTED
    assert plan.decisions[0].reason == INSUFFICIENT_FUNDS


def test_releases_come_first_and_free_money_for_the_rest_of_the_batch() -> None:
    voided = hold(1, 70, status=HoldStatus.HELD, void_requested=True)
    expired = hold(2, 20, status=HoldStatus.HELD, expired=True)
    transfer = PendingTransfer(5, ALICE, BOB, 90, 0, created_at=at(0))
    plan = plan_batch([transfer], accounts(100, alice_held=90), FEE, [expired, voided])
    assert plan.holds == [HoldDecision(1, HoldStatus.VOIDED), HoldDecision(2, HoldStatus.EXPIRED)]
    assert plan.decisions[0].status == TransferStatus.SETTLED
    assert plan.held == {ALICE: 0}
    assert plan.balances[ALICE] == 10


def test_a_pending_hold_voided_or_expired_never_reserves() -> None:
    plan = plan_batch(
        [], accounts(100), FEE, [hold(1, 50, void_requested=True), hold(2, 50, expired=True)]
    )
    assert plan.holds == [HoldDecision(1, HoldStatus.VOIDED), HoldDecision(2, HoldStatus.EXPIRED)]
    assert plan.held == {}


def test_reservations_and_transfers_go_in_the_order_they_were_made() -> None:
    early = PendingTransfer(9, ALICE, BOB, 80, 0, created_at=at(1))
    late = PendingTransfer(10, ALICE, BOB, 80, 0, created_at=at(3))
    plan = plan_batch([late, early], accounts(100), FEE, [hold(2, 20)])
    assert [d.status for d in plan.decisions] == [TransferStatus.SETTLED, TransferStatus.REJECTED]
    assert plan.holds == [HoldDecision(2, HoldStatus.HELD)]


def capture(transfer_id: int, amount: int, commission: int, **fields: object) -> PendingTransfer:
    values: dict = {"hold_reserve": 103, "hold_active": True, "created_at": at(50), **fields}
    return PendingTransfer(
        transfer_id, ALICE, BOB, amount, commission, kind=TransferKind.CAPTURE, hold_id=7, **values
    )


def test_a_capture_spends_its_own_reservation_and_releases_all_of_it() -> None:
    # 103 held of a balance of 103: nothing available, yet the capture of 60 + 2 settles.
    plan = plan_batch([capture(20, 60, 2)], accounts(103, alice_held=103), FEE)
    assert plan.decisions[0].status == TransferStatus.SETTLED
    assert plan.holds == [HoldDecision(7, HoldStatus.CAPTURED, captured_amount=60)]
    assert plan.held == {ALICE: 0}
    assert plan.balances == {ALICE: 41, BOB: 60, FEE: 2}


def test_a_capture_of_a_hold_no_longer_active_is_refused_and_touches_no_hold() -> None:
    plan = plan_batch([capture(20, 60, 2, hold_active=False)], accounts(103, 103), FEE)
    assert plan.decisions[0].reason == HOLD_NOT_ACTIVE
    assert plan.holds == []
    assert plan.held == {}


def test_refunds_add_up_per_original_and_rejected_ones_give_their_room_back() -> None:
    refunds = [
        PendingTransfer(30, BOB, ALICE, 40, 0, kind=TransferKind.REFUND, refund_of=3),
        PendingTransfer(31, BOB, ALICE, 50, 0, kind=TransferKind.REFUND, refund_of=3),
        PendingTransfer(32, BOB, ALICE, 30, 0, kind=TransferKind.REFUND, refund_of=3),
    ]
    plan = plan_batch(refunds, accounts(0, bob=100), FEE)
    assert [d.status for d in plan.decisions] == [
        TransferStatus.SETTLED,
        TransferStatus.SETTLED,
        TransferStatus.REJECTED,
    ]
    assert plan.refunds == {3: (90, 30)}


# --- The property ---------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[int, AccountState], list, list]:
    users = [ALICE, BOB, 12]
    balances = {u: draw(st.integers(0, 300)) for u in users}
    held = dict.fromkeys(users, 0)
    holds: list[PendingHold] = []
    transfers: list[PendingTransfer] = []
    next_id = iter(range(1, 10_000))
    # Holds already held (to release or capture): their reservations make up `held`.
    for user in users:
        for _ in range(draw(st.integers(0, 2))):
            reserve = draw(st.integers(1, 100))
            if held[user] + reserve > balances[user]:
                continue
            held[user] += reserve
            hold_id = next(next_id)
            use = draw(st.sampled_from(["void", "expire", "capture", "keep"]))
            if use == "capture":
                payee = draw(st.sampled_from([u for u in users if u != user]))
                commission = draw(st.integers(0, reserve // 10))
                amount = draw(st.integers(1, reserve - commission))
                capture_id = next(next_id)
                transfers.append(
                    PendingTransfer(
                        capture_id, user, payee, amount, commission,
                        kind=TransferKind.CAPTURE, hold_id=hold_id, hold_reserve=reserve,
                        hold_active=True, created_at=at(capture_id),
                    )
                )  # fmt: skip
            elif use != "keep":
                holds.append(
                    PendingHold(
                        hold_id, HoldStatus.HELD, user, reserve,
                        void_requested=use == "void", expired=use == "expire",
                    )
                )  # fmt: skip
    for _ in range(draw(st.integers(0, 15))):
        payer, payee = draw(st.permutations(users))[:2]
        # Ids are handed out in the order things are made, as the database's sequences do.
        made = next(next_id)
        if draw(st.booleans()):
            reserve = draw(st.integers(1, 200))
            holds.append(PendingHold(made, HoldStatus.PENDING, payer, reserve, created_at=at(made)))
        else:
            amount, commission = draw(st.integers(1, 200)), draw(st.integers(0, 5))
            transfers.append(
                PendingTransfer(made, payer, payee, amount, commission, created_at=at(made))
            )
    state = {
        EXT: AccountState(EXT, AccountKind.EXTERNAL, -sum(balances.values())),
        FEE: AccountState(FEE, AccountKind.COMMISSION, 0),
    }
    state.update({u: AccountState(u, AccountKind.USER, balances[u], held[u]) for u in users})
    return state, transfers, holds


def oracle(state: dict[int, AccountState], transfers: list, holds: list) -> tuple[dict, dict]:
    balance = {i: a.balance for i, a in state.items()}
    held = {i: a.held for i, a in state.items()}
    for h in holds:
        if h.status == HoldStatus.HELD:
            held[h.from_account_id] -= h.reserve
    pending = [h for h in holds if h.status == HoldStatus.PENDING]
    # In the order they were made.
    for op in sorted([*pending, *transfers], key=lambda op: op.created_at):
        if isinstance(op, PendingHold):
            if balance[op.from_account_id] - held[op.from_account_id] >= op.reserve:
                held[op.from_account_id] += op.reserve
            continue
        own = op.hold_reserve if op.hold_id is not None else 0
        if balance[op.from_account_id] - held[op.from_account_id] + own < op.amount + op.commission:
            continue
        held[op.from_account_id] -= own
        balance[op.from_account_id] -= op.amount + op.commission
        balance[op.to_account_id] += op.amount
        balance[FEE] += op.commission
    return balance, held


@given(batches())
@examples(300)
def test_a_batch_matches_the_oracle_and_never_overdraws(batch: tuple) -> None:
    state, transfers, holds = batch
    copies = {i: replace(a) for i, a in state.items()}
    plan = plan_batch(transfers, copies, FEE, holds)
    balance = {i: plan.balances.get(i, a.balance) for i, a in state.items()}
    held = {i: plan.held.get(i, a.held) for i, a in state.items()}
    assert (balance, held) == oracle(state, transfers, holds)
    assert sum(balance.values()) == sum(a.balance for a in state.values())
    for account_id, account in state.items():
        if account.kind != AccountKind.EXTERNAL:
            assert 0 <= held[account_id] <= balance[account_id]
    # Every hold with work is decided exactly once; every capture's hold follows it.
    decided = [d.hold_id for d in plan.holds]
    assert len(decided) == len(set(decided))
    assert set(decided) == {h.id for h in holds} | {t.hold_id for t in transfers if t.hold_id}
