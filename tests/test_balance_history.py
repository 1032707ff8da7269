"""docs/api.md "Balance history": GET /accounts/{id}?at=, checked against the postings
settlement wrote (before the first, exactly at one, between two, after the last), every
refusal, the visibility rule, and a property replaying the statement at random instants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tests.conftest import SUPERUSER, Member, assert_problem, read_all_pages
from tests.properties import examples

ACCOUNT_AT_FIELDS = {"id", "user_id", "currency", "kind", "balance", "created_at", "as_of"}
MISSING_ID = 2**62
MICROSECOND = timedelta(microseconds=1)


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def balance_at(api, member: Member, account_id: int, at: str) -> dict[str, Any]:
    response = api.client.get(
        f"/accounts/{account_id}", query_string={"at": at}, headers=member.auth
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def settled(api, member: Member, response) -> dict[str, Any]:
    assert response.status_code == 202, response.get_json()
    transfer = api.wait_final(member, response.get_json()["id"])
    assert transfer["status"] == "settled", transfer
    return transfer


@pytest.fixture
def history(api) -> tuple[Member, Member, list[dict[str, Any]]]:
    """Alice's USD account with five postings in five batches: a deposit, two payments
    out (with their commission), one in, and a second deposit."""
    alice = api.funded("100.00")
    bob = api.funded("50.00")
    a, b = alice.accounts["USD"], bob.accounts["USD"]
    settled(api, alice, api.transfer(alice, a, b, "10.00"))
    settled(api, bob, api.transfer(bob, b, a, "7.25"))
    settled(api, alice, api.transfer(alice, a, b, "0.01"))
    deposit = api.deposit(a, "3.00")
    assert api.wait_final(SUPERUSER, deposit["id"])["status"] == "settled"
    postings, _ = read_all_pages(api.client, f"/accounts/{a}/postings", alice.auth)
    assert len(postings) == 5
    return alice, bob, postings


def test_balance_before_at_and_between_postings_and_after_the_last(api, history) -> None:
    alice, _, postings = history
    account_id = alice.accounts["USD"]
    times = [parse(p["created_at"]) for p in postings]
    # Each payment settled in its own batch, after the previous one was final.
    assert times == sorted(times)
    assert len(set(times)) == len(times)

    before = balance_at(api, alice, account_id, instant(times[0] - MICROSECOND))
    assert before["balance"] == "0.00"
    for index, posting in enumerate(postings):
        exactly = balance_at(api, alice, account_id, posting["created_at"])
        assert exactly["balance"] == posting["balance_after"]
        assert exactly["as_of"] == posting["created_at"]
        just_before = balance_at(api, alice, account_id, instant(times[index] - MICROSECOND))
        expected = postings[index - 1]["balance_after"] if index else "0.00"
        assert just_before["balance"] == expected
        if index + 1 < len(postings):
            middle = times[index] + (times[index + 1] - times[index]) / 2
            between = balance_at(api, alice, account_id, instant(middle))
            assert between["balance"] == posting["balance_after"]

    after = balance_at(api, alice, account_id, instant(datetime.now(UTC)))
    assert after["balance"] == postings[-1]["balance_after"] == api.balance(alice, account_id)


def test_the_balance_at_a_transfers_settled_at_includes_it(api) -> None:
    # Settlement stamps postings with their transfer's settled_at, so a client asking for
    # the balance "when transfer X settled" sees X applied, on both sides.
    alice = api.funded("30.00", "CNY")
    bob = api.register()
    a, b = alice.accounts["CNY"], bob.accounts["CNY"]
    transfer = settled(api, alice, api.transfer(alice, a, b, "4.00"))
    at = transfer["settled_at"]
    alice_then = balance_at(api, alice, a, at)["balance"]
    assert alice_then == api.balance(alice, a)
    assert balance_at(api, bob, b, at)["balance"] == "4.00"
    before = instant(parse(at) - MICROSECOND)
    assert balance_at(api, alice, a, before)["balance"] == "30.00"
    assert balance_at(api, bob, b, before)["balance"] == "0.00"
    postings, _ = read_all_pages(api.client, f"/accounts/{b}/postings", bob.auth)
    assert [p["created_at"] for p in postings] == [at]


def test_the_answer_is_the_account_with_its_past_balance_and_as_of(api, history) -> None:
    alice, _, postings = history
    account_id = alice.accounts["USD"]
    now = api.client.get(f"/accounts/{account_id}", headers=alice.auth).get_json()
    assert "as_of" not in now
    at = postings[1]["created_at"]
    body = balance_at(api, alice, account_id, at)
    assert set(body) == ACCOUNT_AT_FIELDS
    assert {k: v for k, v in body.items() if k not in ("balance", "as_of")} == {
        k: v for k, v in now.items() if k not in ("balance", "held", "available")
    }
    assert body["balance"] == postings[1]["balance_after"]


def test_at_is_normalised_to_utc_with_microseconds(api, history) -> None:
    alice, _, postings = history
    account_id = alice.accounts["USD"]
    moment = parse(postings[2]["created_at"])
    in_kolkata = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))
    # Nine fractional digits: the three past the microsecond are cut, not rounded up.
    text = in_kolkata.strftime("%Y-%m-%dT%H:%M:%S.%f") + "999+05:30"
    body = balance_at(api, alice, account_id, text)
    assert body["as_of"] == postings[2]["created_at"]
    assert body["balance"] == postings[2]["balance_after"]
    assert balance_at(api, alice, account_id, instant(moment).lower())["as_of"] == instant(moment)


def test_an_instant_before_the_account_existed_is_zero(api) -> None:
    member = api.funded("5.00", "EUR")
    body = balance_at(api, member, member.accounts["EUR"], "2000-01-01T00:00:00Z")
    assert (body["balance"], body["as_of"]) == ("0.00", "2000-01-01T00:00:00.000000Z")


def test_a_negative_balance_of_an_external_account_in_the_past(api, history) -> None:
    # Deposits come from the currency's external account, whose balance goes negative.
    accounts = api.client.get("/users/1/accounts", headers=SUPERUSER.auth).get_json()
    [external] = [a for a in accounts if a["currency"] == "USD" and a["kind"] == "external"]
    body = balance_at(api, SUPERUSER, external["id"], instant(datetime.now(UTC)))
    assert body["balance"] == external["balance"]
    assert body["balance"].startswith("-")


@pytest.mark.parametrize(
    "at",
    [
        "",
        "yesterday",
        "2026-11-27",
        "2026-11-27T10:15:30",
        "2026-11-27T10:15:30+0100",
        "2026-02-30T10:15:30Z",
        "2026-11-27T23:59:60Z",
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59.999999-23:59",
        "2026-11-27T10:15:30Z\x00",
        "x" * 10_000,
    ],
)
def test_a_malformed_at_is_invalid_query(api, at: str) -> None:
    member = api.register()
    response = api.client.get(
        f"/accounts/{member.accounts['USD']}", query_string={"at": at}, headers=member.auth
    )
    assert_problem(response, 400, "invalid_query")


def test_an_at_in_the_future_is_invalid_query(api) -> None:
    member = api.register()
    account_id = member.accounts["USD"]
    for later in (timedelta(minutes=5), timedelta(days=365 * 100)):
        response = api.client.get(
            f"/accounts/{account_id}",
            query_string={"at": instant(datetime.now(UTC) + later)},
            headers=member.auth,
        )
        problem = assert_problem(response, 400, "invalid_query")
        assert "future" in problem["detail"]


def test_visibility_is_that_of_the_account(api, history) -> None:
    alice, bob, postings = history
    account_id = alice.accounts["USD"]
    at = postings[0]["created_at"]
    path = f"/accounts/{account_id}"
    unauthenticated = api.client.get(path, query_string={"at": at})
    assert_problem(unauthenticated, 401, "unauthorized")
    other = api.client.get(path, query_string={"at": at}, headers=bob.auth)
    assert_problem(other, 404, "account_not_found")
    missing = api.client.get(f"/accounts/{MISSING_ID}", query_string={"at": at}, headers=bob.auth)
    assert_problem(missing, 404, "account_not_found")
    # The superuser sees every account's past, as it sees its present.
    superuser = balance_at(api, SUPERUSER, account_id, at)
    assert superuser["balance"] == postings[0]["balance_after"]


def test_the_statement_replays_to_the_same_balance_at_any_instant(api) -> None:
    """Property: ?at=T equals the sum of the amounts of the account's postings with
    created_at <= T, for random T around and between the postings."""
    alice = api.funded("20.00", "EUR")
    bob = api.funded("20.00", "EUR")
    a, b = alice.accounts["EUR"], bob.accounts["EUR"]
    for amount in ("1.00", "2.50", "0.03"):
        settled(api, alice, api.transfer(alice, a, b, amount))
        settled(api, bob, api.transfer(bob, b, a, "0.07"))
    # A batch of several transfers settles together: postings close in time, maybe equal.
    sent = [api.transfer(alice, a, b, "0.10") for _ in range(3)]
    for response in sent:
        settled(api, alice, response)
    end = datetime.now(UTC)
    postings, _ = read_all_pages(api.client, f"/accounts/{a}/postings", alice.auth)
    times = [parse(p["created_at"]) for p in postings]
    assert times == sorted(times)
    start = times[0] - timedelta(seconds=1)

    def replay(at: datetime) -> Decimal:
        return sum(
            (Decimal(p["amount"]) for p, t in zip(postings, times, strict=True) if t <= at),
            Decimal("0.00"),
        )

    near_a_posting = st.builds(
        lambda t, micros: t + timedelta(microseconds=micros),
        st.sampled_from(times),
        st.integers(-3, 3),
    )
    anywhere = st.integers(0, int((end - start) / MICROSECOND)).map(
        lambda m: start + m * MICROSECOND
    )
    offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))

    @examples(60)
    @given(at=st.one_of(near_a_posting, anywhere), zone=offsets)
    def check(at: datetime, zone: timezone) -> None:
        at = min(at, end)
        text = at.astimezone(zone).isoformat(timespec="microseconds")
        note(text)
        body = balance_at(api, alice, a, text)
        assert Decimal(body["balance"]) == replay(at)
        assert body["as_of"] == instant(at)

    check()


def test_a_plus_offset_must_be_percent_encoded(api) -> None:
    member = api.register()
    path = f"/accounts/{member.accounts['USD']}?at=2026-01-01T05:30:00"
    encoded = api.client.get(path + "%2B05:30", headers=member.auth)
    assert encoded.status_code == 200
    assert encoded.get_json()["as_of"] == "2026-01-01T00:00:00.000000Z"
    bare = api.client.get(path + "+05:30", headers=member.auth)  # "+" reads as a space
    assert_problem(bare, 400, "invalid_query")
