"""The pure settlement rules: common.ledger.plan_batch, property-based.

The oracle is a naive sequential ledger written here, independently of the code
under test: apply the transfers one at a time in id order, refuse any that would
take a non-external account below zero.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from hypothesis import example, given
from hypothesis import strategies as st

from common.ledger import (
    BALANCE_LIMIT,
    INSUFFICIENT_FUNDS,
    MAX_BALANCE,
    AccountState,
    PendingTransfer,
    Plan,
    plan_batch,
)
from common.models import AccountKind, PostingLeg, TransferStatus
from tests.properties import examples

PROPERTY = examples(200)


@dataclass(frozen=True)
class Scenario:
    accounts: dict[int, AccountState]
    commission_account_id: int
    external_account_id: int
    transfers: list[PendingTransfer]

    def fresh_accounts(self) -> dict[int, AccountState]:
        # plan_batch must not depend on (or mutate) the caller's objects; hand it copies.
        return {
            account_id: AccountState(state.id, state.kind, state.balance)
            for account_id, state in self.accounts.items()
        }


small_balance = st.integers(min_value=0, max_value=2_000)
huge_balance = st.integers(min_value=MAX_BALANCE - 5_000, max_value=MAX_BALANCE)


@st.composite
def scenarios(draw: st.DrawFn, max_transfers: int = 25) -> Scenario:
    user_count = draw(st.integers(min_value=1, max_value=5))
    ids = draw(
        st.lists(
            st.integers(min_value=1, max_value=10_000),
            min_size=user_count + 2,
            max_size=user_count + 2,
            unique=True,
        )
    )
    external_id, commission_id, *user_ids = ids
    near_limit = draw(st.booleans())
    accounts = {
        external_id: AccountState(
            external_id,
            AccountKind.EXTERNAL,
            draw(
                st.integers(min_value=-(MAX_BALANCE - 1_000), max_value=-(MAX_BALANCE - 10_000))
                if near_limit
                else st.integers(min_value=-1_000_000, max_value=0)
            ),
        ),
        commission_id: AccountState(
            commission_id,
            AccountKind.COMMISSION,
            draw(huge_balance if near_limit else small_balance),
        ),
    }
    for user_id in user_ids:
        balance = draw(st.one_of(small_balance, huge_balance) if near_limit else small_balance)
        accounts[user_id] = AccountState(user_id, AccountKind.USER, balance)

    everyone = list(accounts)
    transfer_count = draw(st.integers(min_value=0, max_value=max_transfers))
    transfer_ids = draw(
        st.lists(
            st.integers(min_value=1, max_value=1_000_000),
            min_size=transfer_count,
            max_size=transfer_count,
            unique=True,
        )
    )
    transfers = []
    for transfer_id in transfer_ids:
        source = draw(st.sampled_from(everyone))
        # Any other account: a user, the external one, or the commission account itself.
        target = draw(
            st.one_of(st.just(commission_id), st.sampled_from(everyone)).filter(
                lambda account_id, source=source: account_id != source
            )
        )
        commission = draw(st.one_of(st.just(0), st.integers(min_value=1, max_value=40)))
        amount = draw(st.integers(min_value=1, max_value=800))
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            # The edge: exactly what the payer started with, give or take one unit.
            exact = accounts[source].balance - commission + draw(st.sampled_from([-1, 0, 1]))
            amount = min(max(exact, 1), MAX_BALANCE // 4)
        transfers.append(PendingTransfer(transfer_id, source, target, amount, commission))
    # Delivered in any order: the plan must apply them in id order regardless.
    transfers = draw(st.permutations(transfers))
    return Scenario(accounts, commission_id, external_id, list(transfers))


def reference_ledger(
    scenario: Scenario,
) -> tuple[list[tuple[int, TransferStatus, str | None]], dict[int, int], list[tuple]]:
    """The naive oracle: one transfer at a time, in id order.

    Returns the decisions, final balances of every account, and the postings as
    (transfer_id, account_id, leg, amount).
    """
    balances = {account_id: state.balance for account_id, state in scenario.accounts.items()}
    kinds = {account_id: state.kind for account_id, state in scenario.accounts.items()}
    decisions = []
    postings = []
    for transfer in sorted(scenario.transfers, key=lambda t: t.id):
        total = transfer.amount + transfer.commission
        if kinds[transfer.from_account_id] != AccountKind.EXTERNAL and (
            balances[transfer.from_account_id] < total
        ):
            decisions.append((transfer.id, TransferStatus.REJECTED, INSUFFICIENT_FUNDS))
            continue
        trial = dict(balances)
        trial[transfer.from_account_id] -= total
        trial[transfer.to_account_id] += transfer.amount
        trial[scenario.commission_account_id] += transfer.commission
        if any(abs(value) > MAX_BALANCE for value in trial.values()):
            decisions.append((transfer.id, TransferStatus.REJECTED, BALANCE_LIMIT))
            continue
        balances = trial
        decisions.append((transfer.id, TransferStatus.SETTLED, None))
        postings.append((transfer.id, transfer.from_account_id, PostingLeg.DEBIT, -total))
        postings.append((transfer.id, transfer.to_account_id, PostingLeg.CREDIT, transfer.amount))
        if transfer.commission:
            postings.append(
                (
                    transfer.id,
                    scenario.commission_account_id,
                    PostingLeg.COMMISSION,
                    transfer.commission,
                )
            )
    return decisions, balances, postings


def run_plan(scenario: Scenario) -> Plan:
    return plan_batch(scenario.transfers, scenario.fresh_accounts(), scenario.commission_account_id)


def final_balances(scenario: Scenario, plan: Plan) -> dict[int, int]:
    balances = {account_id: state.balance for account_id, state in scenario.accounts.items()}
    for posting in plan.postings:
        balances[posting.account_id] += posting.amount
    return balances


@PROPERTY
@given(scenarios())
def test_plan_matches_the_sequential_reference(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    decisions, balances, postings = reference_ledger(scenario)
    assert [(d.transfer_id, d.status, d.reason) for d in plan.decisions] == decisions
    assert [(p.transfer_id, p.account_id, p.leg, p.amount) for p in plan.postings] == postings
    assert final_balances(scenario, plan) == balances


@PROPERTY
@given(scenarios())
def test_every_transfer_gets_exactly_one_decision(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    assert Counter(d.transfer_id for d in plan.decisions) == Counter(
        t.id for t in scenario.transfers
    )
    # In id order, whatever order they came in.
    assert [d.transfer_id for d in plan.decisions] == sorted(t.id for t in scenario.transfers)
    for decision in plan.decisions:
        if decision.status == TransferStatus.SETTLED:
            assert decision.reason is None
        else:
            assert decision.status == TransferStatus.REJECTED
            assert decision.reason in (INSUFFICIENT_FUNDS, BALANCE_LIMIT)


@PROPERTY
@given(scenarios())
def test_plan_conserves_money(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    by_transfer: dict[int, list[int]] = defaultdict(list)
    for posting in plan.postings:
        by_transfer[posting.transfer_id].append(posting.amount)
    for amounts in by_transfer.values():
        assert sum(amounts) == 0
    # Nothing created or destroyed overall.
    before = sum(state.balance for state in scenario.accounts.values())
    assert sum(final_balances(scenario, plan).values()) == before
    # plan.balances is the final balance of every account that changed, and only those.
    final = final_balances(scenario, plan)
    touched = {posting.account_id for posting in plan.postings}
    assert set(plan.balances) == touched
    for account_id, balance in plan.balances.items():
        assert balance == final[account_id]


@PROPERTY
@given(scenarios())
def test_postings_have_the_legs_of_their_transfer(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    transfers = {t.id: t for t in scenario.transfers}
    settled = {d.transfer_id for d in plan.decisions if d.status == TransferStatus.SETTLED}
    legs: dict[int, dict[PostingLeg, tuple[int, int]]] = defaultdict(dict)
    for posting in plan.postings:
        assert posting.leg not in legs[posting.transfer_id], "a leg written twice"
        legs[posting.transfer_id][posting.leg] = (posting.account_id, posting.amount)
        assert posting.amount != 0
    assert set(legs) == settled
    for transfer_id in settled:
        transfer = transfers[transfer_id]
        expected = {
            PostingLeg.DEBIT: (
                transfer.from_account_id,
                -(transfer.amount + transfer.commission),
            ),
            PostingLeg.CREDIT: (transfer.to_account_id, transfer.amount),
        }
        if transfer.commission:
            expected[PostingLeg.COMMISSION] = (
                scenario.commission_account_id,
                transfer.commission,
            )
        assert legs[transfer_id] == expected


@PROPERTY
@given(scenarios())
def test_no_non_external_balance_goes_below_zero(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    running = {account_id: state.balance for account_id, state in scenario.accounts.items()}
    current_transfer = None
    for posting in plan.postings:
        if posting.transfer_id != current_transfer:
            # Checked after each whole transfer (a transfer's legs are one atomic step).
            _assert_no_overdraft(scenario, running)
            current_transfer = posting.transfer_id
        running[posting.account_id] += posting.amount
    _assert_no_overdraft(scenario, running)
    for account_id, balance in plan.balances.items():
        if scenario.accounts[account_id].kind != AccountKind.EXTERNAL:
            assert balance >= 0
        assert abs(balance) <= MAX_BALANCE


def _assert_no_overdraft(scenario: Scenario, balances: dict[int, int]) -> None:
    for account_id, balance in balances.items():
        if scenario.accounts[account_id].kind != AccountKind.EXTERNAL:
            assert balance >= 0, (account_id, balance)


@PROPERTY
@given(scenarios())
def test_balance_after_chains_per_account(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    running = {account_id: state.balance for account_id, state in scenario.accounts.items()}
    for posting in plan.postings:
        running[posting.account_id] += posting.amount
        assert posting.balance_after == running[posting.account_id], posting
    # The last balance_after of each account is its final balance.
    last: dict[int, int] = {}
    for posting in plan.postings:
        last[posting.account_id] = posting.balance_after
    assert last == plan.balances


@PROPERTY
@given(scenarios())
def test_rejected_transfers_write_nothing(scenario: Scenario) -> None:
    plan = run_plan(scenario)
    rejected = {d.transfer_id for d in plan.decisions if d.status == TransferStatus.REJECTED}
    assert not [p for p in plan.postings if p.transfer_id in rejected]
    # Removing the rejected transfers from the batch gives the very same postings.
    kept = Scenario(
        scenario.accounts,
        scenario.commission_account_id,
        scenario.external_account_id,
        [t for t in scenario.transfers if t.id not in rejected],
    )
    assert run_plan(kept).postings == plan.postings


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_is_pure_and_order_independent(scenario: Scenario, rnd: random.Random) -> None:
    accounts = scenario.fresh_accounts()
    before = {account_id: (s.kind, s.balance) for account_id, s in accounts.items()}
    shuffled = list(scenario.transfers)
    rnd.shuffle(shuffled)
    first = plan_batch(scenario.transfers, accounts, scenario.commission_account_id)
    second = plan_batch(shuffled, accounts, scenario.commission_account_id)
    # The accounts handed in are not mutated, and the input order does not matter.
    assert {account_id: (s.kind, s.balance) for account_id, s in accounts.items()} == before
    assert first == second


@PROPERTY
@given(scenarios(max_transfers=15))
def test_splitting_a_batch_in_id_order_gives_the_same_result(scenario: Scenario) -> None:
    """Two consecutive batches (what two doorbells do) equal one batch of both."""
    ordered = sorted(scenario.transfers, key=lambda t: t.id)
    cut = len(ordered) // 2
    whole = run_plan(scenario)
    accounts = scenario.fresh_accounts()
    head = plan_batch(ordered[:cut], accounts, scenario.commission_account_id)
    for account_id, balance in head.balances.items():
        accounts[account_id].balance = balance
    tail = plan_batch(ordered[cut:], accounts, scenario.commission_account_id)
    assert head.decisions + tail.decisions == whole.decisions
    assert head.postings + tail.postings == whole.postings


# --- examples -----------------------------------------------------------------------------

EXT, FEE, ALICE, BOB = 1, 2, 10, 11


def _accounts(alice: int, bob: int = 0, fee: int = 0, ext: int = 0) -> dict[int, AccountState]:
    return {
        EXT: AccountState(EXT, AccountKind.EXTERNAL, ext),
        FEE: AccountState(FEE, AccountKind.COMMISSION, fee),
        ALICE: AccountState(ALICE, AccountKind.USER, alice),
        BOB: AccountState(BOB, AccountKind.USER, bob),
    }


def test_insufficient_funds_is_rejected_with_its_reason() -> None:
    plan = plan_batch([PendingTransfer(7, ALICE, BOB, 1000, 10)], _accounts(1009), FEE)
    assert [(d.transfer_id, d.status, d.reason) for d in plan.decisions] == [
        (7, TransferStatus.REJECTED, INSUFFICIENT_FUNDS)
    ]
    assert plan.postings == []
    assert plan.balances == {}


def test_exact_balance_including_commission_is_enough() -> None:
    plan = plan_batch([PendingTransfer(7, ALICE, BOB, 1000, 10)], _accounts(1010), FEE)
    assert plan.decisions[0].status == TransferStatus.SETTLED
    assert plan.balances == {ALICE: 0, BOB: 1000, FEE: 10}
    assert [(p.account_id, p.leg, p.amount, p.balance_after) for p in plan.postings] == [
        (ALICE, PostingLeg.DEBIT, -1010, 0),
        (BOB, PostingLeg.CREDIT, 1000, 1000),
        (FEE, PostingLeg.COMMISSION, 10, 10),
    ]


def test_external_account_may_go_negative_and_pays_no_check() -> None:
    plan = plan_batch([PendingTransfer(1, EXT, ALICE, 5000, 0)], _accounts(0), FEE)
    assert plan.decisions[0].status == TransferStatus.SETTLED
    assert plan.balances == {EXT: -5000, ALICE: 5000}
    # A zero commission writes no commission leg.
    assert [p.leg for p in plan.postings] == [PostingLeg.DEBIT, PostingLeg.CREDIT]


def test_id_order_decides_who_gets_the_money() -> None:
    # Alice has 10: transfer 3 (6 + 1) then 5 (5 + 1) is refused, then 9 (3 + 0) fits.
    transfers = [
        PendingTransfer(9, ALICE, BOB, 3, 0),
        PendingTransfer(5, ALICE, BOB, 5, 1),
        PendingTransfer(3, ALICE, BOB, 6, 1),
    ]
    plan = plan_batch(transfers, _accounts(10), FEE)
    assert [(d.transfer_id, d.status) for d in plan.decisions] == [
        (3, TransferStatus.SETTLED),
        (5, TransferStatus.REJECTED),
        (9, TransferStatus.SETTLED),
    ]
    assert plan.balances == {ALICE: 0, BOB: 9, FEE: 1}


def test_money_received_earlier_in_the_batch_can_be_spent_later() -> None:
    transfers = [PendingTransfer(1, EXT, ALICE, 100, 0), PendingTransfer(2, ALICE, BOB, 90, 10)]
    plan = plan_batch(transfers, _accounts(0), FEE)
    assert [d.status for d in plan.decisions] == [TransferStatus.SETTLED] * 2
    assert plan.balances == {EXT: -100, ALICE: 0, BOB: 90, FEE: 10}


def test_payee_is_the_commission_account() -> None:
    plan = plan_batch([PendingTransfer(4, ALICE, FEE, 100, 1)], _accounts(101, fee=5), FEE)
    assert plan.decisions[0].status == TransferStatus.SETTLED
    # Two legs on one account, each with its own running balance_after.
    assert [(p.account_id, p.leg, p.amount, p.balance_after) for p in plan.postings] == [
        (ALICE, PostingLeg.DEBIT, -101, 0),
        (FEE, PostingLeg.CREDIT, 100, 105),
        (FEE, PostingLeg.COMMISSION, 1, 106),
    ]
    assert plan.balances == {ALICE: 0, FEE: 106}


def test_credit_beyond_bigint_is_refused_not_crashed_on() -> None:
    plan = plan_batch(
        [PendingTransfer(1, ALICE, BOB, 10, 0), PendingTransfer(2, ALICE, BOB, 1, 0)],
        _accounts(100, bob=MAX_BALANCE - 10),
        FEE,
    )
    assert [(d.status, d.reason) for d in plan.decisions] == [
        (TransferStatus.SETTLED, None),
        (TransferStatus.REJECTED, BALANCE_LIMIT),
    ]
    assert plan.balances == {ALICE: 90, BOB: MAX_BALANCE}


def test_empty_batch_plans_nothing() -> None:
    plan = plan_batch([], _accounts(10), FEE)
    assert plan == Plan()


@examples(200)
@given(
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=1, max_value=10_000),
    st.integers(min_value=0, max_value=500),
)
@example(balance=100, amount=99, commission=1)
@example(balance=100, amount=100, commission=1)
def test_settles_exactly_when_the_balance_covers_amount_plus_commission(
    balance: int, amount: int, commission: int
) -> None:
    plan = plan_batch([PendingTransfer(1, ALICE, BOB, amount, commission)], _accounts(balance), FEE)
    covered = balance >= amount + commission
    assert plan.decisions[0].status == (
        TransferStatus.SETTLED if covered else TransferStatus.REJECTED
    )
    assert plan.decisions[0].reason == (None if covered else INSUFFICIENT_FUNDS)
    assert bool(plan.postings) == covered
