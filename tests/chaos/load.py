"""The clients of the chaos suite: real HTTP, keep-alive sessions, every answer recorded.

A client retries a request only the way a well-behaved client would: after a 503 (as
long as Retry-After says) or when no answer came at all, always with the same
Idempotency-Key, so a retry can never create a second transfer.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from tests.chaos.harness import SUPERUSER_PASSWORD

SUPERUSER_AUTH = ("superuser", SUPERUSER_PASSWORD)
# requests' (connect, read) timeouts: an API that does not answer within this hangs.
TIMEOUTS = (5, 30)
# gunicorn closes a keep-alive connection idle for its `keepalive` (5 s in
# web.gunicorn_conf); a request sent on it from about then on may meet the close.
KEEPALIVE_RACE_S = 4.0


@dataclass(frozen=True)
class Answer:
    at: float
    method: str
    route: str
    status: int | None
    retry_after: str | None
    content_type: str
    elapsed: float
    error: str | None = None
    code: str | None = None
    # For a request that got no answer: how long its keep-alive connection had been idle.
    idle_s: float | None = None

    @property
    def acceptable_5xx(self) -> bool:
        """The only 5xx a client may see: 503 problem+json telling it when to retry."""
        return (
            self.status == 503
            and bool(self.retry_after)
            and self.content_type.startswith("application/problem+json")
        )


class Recorder:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self._lock = threading.Lock()

    def add(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def bad_5xx(self) -> list[Answer]:
        return [a for a in self.answers if a.status and a.status >= 500 and not a.acceptable_5xx]

    def no_answer(self) -> list[Answer]:
        """Requests that got no HTTP answer at all, except the keep-alive race: a request
        sent on a connection the server was just closing for idleness (gunicorn's
        keepalive, 5 s) is reset; a client cannot tell it apart from a lost request, so
        it sends it again with the same Idempotency-Key (and the re-send is answered)."""
        return [
            a
            for a in self.answers
            if a.status is None and not (a.idle_s is not None and a.idle_s >= KEEPALIVE_RACE_S)
        ]

    def keepalive_races(self) -> int:
        return sum(1 for a in self.answers if a.status is None) - len(self.no_answer())

    def by_status(self) -> dict[str, int]:
        counts = Counter(str(a.status) if a.status else "no answer" for a in self.answers)
        return dict(sorted(counts.items()))


class GaveUp(Exception):
    """A request got no usable answer before its deadline."""


class ApiClient:
    def __init__(self, base_url: str, recorder: Recorder, auth: tuple[str, str]) -> None:
        self.base_url = base_url
        self.recorder = recorder
        self.auth = auth
        self.session = requests.Session()
        self.last_answer: float | None = None

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        route: str,
        deadline_s: float = 180,
        auth: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """Send until an answer that is not a 503 (503s and lost answers are retried)."""
        give_up = time.monotonic() + deadline_s
        while True:
            started = time.monotonic()
            idle = None if self.last_answer is None else started - self.last_answer
            try:
                response = self.session.request(
                    method,
                    self.base_url + path,
                    auth=auth or self.auth,
                    timeout=TIMEOUTS,
                    **kwargs,
                )
            except requests.RequestException as error:
                self.last_answer = None
                self.recorder.add(
                    Answer(
                        started,
                        method,
                        route,
                        None,
                        None,
                        "",
                        time.monotonic() - started,
                        f"{type(error).__name__}: {error}",
                        idle_s=idle,
                    )
                )
                if time.monotonic() > give_up:
                    raise GaveUp(f"{method} {path}: {error}") from error
                # A fresh connection next time.
                self.session.close()
                self.session = requests.Session()
                time.sleep(0.2)
                continue
            self.last_answer = time.monotonic()
            content_type = response.headers.get("Content-Type", "")
            code = None
            if content_type.startswith("application/problem+json"):
                with contextlib.suppress(ValueError):
                    code = response.json().get("code")
            self.recorder.add(
                Answer(
                    started,
                    method,
                    route,
                    response.status_code,
                    response.headers.get("Retry-After"),
                    content_type,
                    time.monotonic() - started,
                    None,
                    code,
                )
            )
            if response.status_code != 503:
                return response
            if time.monotonic() > give_up:
                raise GaveUp(f"{method} {path}: still 503")
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(wait, 2.0) * random.uniform(0.5, 1.0))


@dataclass
class User:
    id: int
    username: str
    password: str
    accounts: dict[str, int] = field(default_factory=dict)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)


@dataclass(frozen=True)
class Submitted:
    """A transfer the API accepted (202), as the client asked for it."""

    key: str
    requested_by: int
    from_account: int
    to_account: int
    amount: str
    transfer_id: int
    route: str


def minor_units(amount: str, decimals: int = 2) -> int:
    whole, _, fraction = amount.partition(".")
    return int(whole) * 10**decimals + int(fraction.ljust(decimals, "0") or 0)


class Load:
    """Clients submitting transfers among funded users until told to stop.

    Each client owns a few users and sends from their accounts to random others, with an
    Idempotency-Key on every transfer; some requests are re-sent with the same key (the
    same transfer must come back), some go through the batch route. Some refund part of
    a transfer they received, some pay out, some place holds (expiring after a minute)
    and later capture part of them or void them. One more client is the superuser,
    topping accounts up by deposits now and then.
    """

    def __init__(
        self,
        base_url: str,
        users: list[User],
        recorder: Recorder,
        *,
        clients: int,
        max_per_client: int,
        pace: tuple[float, float] = (0.5, 1.5),
        resend_share: float = 0.1,
        batch_share: float = 0.05,
        poll_share: float = 0.05,
        refund_share: float = 0.06,
        payout_share: float = 0.06,
        hold_share: float = 0.1,
        seed: int = 20261127,
    ) -> None:
        self.base_url = base_url
        self.users = users
        self.recorder = recorder
        self.clients = clients
        self.max_per_client = max_per_client
        self.pace = pace
        self.resend_share = resend_share
        self.batch_share = batch_share
        self.poll_share = poll_share
        self.refund_share = refund_share
        self.payout_share = payout_share
        self.hold_share = hold_share
        self.seed = seed
        # Holds the API accepted: (maker, Idempotency-Key, hold id).
        self.holds: list[tuple[int, str, int]] = []
        # Answers a client expects now and then: a refund that no longer fits.
        self.refused: Counter[str] = Counter()
        self.stop = threading.Event()
        self.submitted: list[Submitted] = []
        self.resends = 0
        self.resend_mismatches: list[str] = []
        self.unexpected: list[str] = []
        self.gave_up: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        owners: list[list[User]] = [[] for _ in range(self.clients)]
        for index, user in enumerate(self.users):
            owners[index % self.clients].append(user)
        for index, owned in enumerate(owners):
            thread = threading.Thread(
                target=self._guard, args=(self._client, index, owned), name=f"client-{index}"
            )
            self._threads.append(thread)
        self._threads.append(
            threading.Thread(target=self._guard, args=(self._depositor,), name="depositor")
        )
        for thread in self._threads:
            thread.start()

    def finish(self, timeout: float = 240) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"clients still running {timeout:.0f} s after stop: {alive}"

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except GaveUp as error:
            with self._lock:
                self.gave_up.append(str(error))
        except Exception as error:  # a client bug must fail the test, not vanish
            with self._lock:
                self.unexpected.append(f"{threading.current_thread().name}: {error!r}")

    def _accepted(self, item: Submitted) -> None:
        with self._lock:
            self.submitted.append(item)

    def _client(self, index: int, owned: list[User]) -> None:
        rng = random.Random(self.seed + index)
        # One keep-alive session per client, shared by the users it plays.
        client = ApiClient(self.base_url, self.recorder, owned[0].auth)
        # This client's holds not yet captured or voided: (maker, hold id, amount).
        holds: list[tuple[User, int, int]] = []
        try:
            sent = 0
            while not self.stop.is_set() and sent < self.max_per_client:
                payer = rng.choice(owned)
                client.auth = payer.auth
                currency = "USD" if rng.random() < 0.75 else "EUR"
                choice = rng.random()
                if choice < self.batch_share:
                    sent += self._batch(rng, client, payer, currency)
                elif choice < self.batch_share + self.refund_share:
                    self._refund(rng, client, payer, currency)
                    sent += 1
                elif choice < self.batch_share + self.refund_share + self.payout_share:
                    self._payout(rng, client, payer, currency)
                    sent += 1
                elif choice < (
                    self.batch_share + self.refund_share + self.payout_share + self.hold_share
                ):
                    self._hold_work(rng, client, payer, currency, holds)
                    sent += 1
                else:
                    self._single(rng, client, payer, currency)
                    sent += 1
                time.sleep(rng.uniform(*self.pace))
        finally:
            client.close()

    def _target(self, rng: random.Random, payer: User, currency: str) -> int:
        while True:
            payee = rng.choice(self.users)
            if payee.id != payer.id:
                return payee.accounts[currency]

    @staticmethod
    def _amount(rng: random.Random) -> str:
        cents = rng.randint(1, 2500)
        if cents % 100 == 0 and rng.random() < 0.5:
            return str(cents // 100)
        return f"{cents // 100}.{cents % 100:02d}"

    def _single(self, rng: random.Random, client: ApiClient, payer: User, currency: str) -> None:
        key = f"t-{payer.id}-{uuid.uuid4().hex}"
        fields = {
            "from": payer.accounts[currency],
            "to": self._target(rng, payer, currency),
            "amount": self._amount(rng),
        }
        path = f"/users/{payer.id}/transfers"
        headers = {"Idempotency-Key": key}
        response = client.request("POST", path, route="transfer", data=fields, headers=headers)
        if response.status_code != 202:
            with self._lock:
                self.unexpected.append(f"POST {path} -> {response.status_code} {response.text}")
            return
        body = response.json()
        item = Submitted(
            key, payer.id, fields["from"], fields["to"], fields["amount"], body["id"], "single"
        )
        self._accepted(item)
        if rng.random() < self.poll_share:
            # A long poll, as a client waiting for the outcome would do.
            started = time.monotonic()
            polled = client.request(
                "GET", f"{path}/{item.transfer_id}", route="poll", params={"wait": "2"}
            )
            if polled.status_code != 200 or polled.json().get("id") != item.transfer_id:
                with self._lock:
                    self.unexpected.append(f"poll {item.transfer_id} -> {polled.status_code}")
            elif time.monotonic() - started > 2 + TIMEOUTS[0]:
                with self._lock:
                    self.unexpected.append(f"poll {item.transfer_id} held too long")
        if rng.random() < self.resend_share:
            again = client.request("POST", path, route="transfer", data=fields, headers=headers)
            self._check_resend(item, again.status_code, again.json())

    def _send(
        self,
        rng: random.Random,
        client: ApiClient,
        path: str,
        fields: dict[str, Any],
        *,
        route: str,
        key: str,
        expected: tuple[str, ...] = (),
        resend: bool = True,
    ) -> dict[str, Any] | None:
        """POST with an Idempotency-Key (re-sent now and then with the same key, if
        `resend`): the accepted body, or None after an answer with an `expected` code."""
        headers = {"Idempotency-Key": key}
        response = client.request("POST", path, route=route, data=fields, headers=headers)
        if response.status_code != 202:
            code = response.json().get("code") if response.status_code < 500 else None
            with self._lock:
                if code in expected:
                    self.refused[code] += 1
                else:
                    self.unexpected.append(f"POST {path} -> {response.status_code} {response.text}")
            return None
        body: dict[str, Any] = response.json()
        if resend and rng.random() < self.resend_share:
            again = client.request("POST", path, route=route, data=fields, headers=headers)
            self._check_resend(
                Submitted(key, 0, 0, 0, "", body["id"], route), again.status_code, again.json()
            )
        return body

    def _refund(self, rng: random.Random, client: ApiClient, payee: User, currency: str) -> None:
        """Part of a transfer this user received, back to its payer."""
        listed = client.request(
            "GET",
            f"/users/{payee.id}/transfers",
            route="list",
            params={"to": payee.id, "status": "settled", "sort": "dsc", "limit": 20},
        )
        received = [
            t
            for t in (listed.json() if listed.status_code == 200 else [])
            if t["kind"] in ("transfer", "capture") and t["currency"] == currency
            and t["from_user_id"] != payee.id
        ]  # fmt: skip
        if not received:
            return
        original = rng.choice(received)
        cents = minor_units(original["amount"])
        amount = rng.randint(1, cents)
        fields = {"amount": f"{amount // 100}.{amount % 100:02d}"}
        key = f"r-{payee.id}-{uuid.uuid4().hex}"
        path = f"/users/{payee.id}/transfers/{original['id']}/refunds"
        body = self._send(
            rng, client, path, fields, route="refund", key=key,
            expected=("refund_exceeds_transfer",),
        )  # fmt: skip
        if body is not None:
            self._accepted(
                Submitted(key, payee.id, original["to"], original["from"], fields["amount"],
                          body["id"], "refund")
            )  # fmt: skip

    def _payout(self, rng: random.Random, client: ApiClient, payer: User, currency: str) -> None:
        key = f"p-{payer.id}-{uuid.uuid4().hex}"
        fields = {
            "from": payer.accounts[currency],
            "amount": self._amount(rng),
            "destination": f"IBAN DE{rng.randrange(10**18):018d}",
        }
        body = self._send(
            rng, client, f"/users/{payer.id}/payouts", fields, route="payout", key=key
        )
        if body is not None:
            self._accepted(
                Submitted(key, payer.id, fields["from"], body["to"], fields["amount"],
                          body["id"], "payout")
            )  # fmt: skip

    def _hold_work(
        self,
        rng: random.Random,
        client: ApiClient,
        payer: User,
        currency: str,
        holds: list[tuple[User, int, int]],
    ) -> None:
        """Place a hold, or capture part of one placed earlier, or void it."""
        if not holds or rng.random() < 0.4:
            key = f"h-{payer.id}-{uuid.uuid4().hex}"
            fields = {
                "from": payer.accounts[currency],
                "to": self._target(rng, payer, currency),
                "amount": self._amount(rng),
                "expires_in": 60,
            }
            path = f"/users/{payer.id}/holds"
            body = self._send(rng, client, path, fields, route="hold", key=key)
            if body is not None:
                holds.append((payer, body["id"], minor_units(fields["amount"])))
                with self._lock:
                    self.holds.append((payer.id, key, body["id"]))
            return
        maker, hold_id, held = holds.pop(rng.randrange(len(holds)))
        client.auth = maker.auth
        path = f"/users/{maker.id}/holds/{hold_id}"
        if rng.random() < 0.3:
            # 409 when the hold was refused, or has expired meanwhile. A void is idempotent
            # by itself, until the settler applied it: not re-sent here.
            self._send(
                rng, client, f"{path}/void", {}, route="void", key=f"v-{uuid.uuid4().hex}",
                expected=("hold_not_active",), resend=False,
            )  # fmt: skip
            return
        key = f"c-{maker.id}-{uuid.uuid4().hex}"
        part = rng.randint(1, held)
        fields = {"amount": f"{part // 100}.{part % 100:02d}"} if rng.random() < 0.5 else {}
        body = self._send(
            rng, client, f"{path}/capture", fields, route="capture", key=key,
            expected=("hold_not_active",),
        )  # fmt: skip
        if body is not None:
            amount = fields.get("amount", body["amount"])
            self._accepted(
                Submitted(key, maker.id, body["from"], body["to"], amount, body["transfer_id"],
                          "capture")
            )  # fmt: skip

    def _check_resend(self, item: Submitted, status: int, body: dict[str, Any]) -> None:
        with self._lock:
            self.resends += 1
            if status != 202 or body.get("id") != item.transfer_id:
                self.resend_mismatches.append(
                    f"key {item.key}: first {item.transfer_id}, again {status} {body}"
                )

    def _batch(self, rng: random.Random, client: ApiClient, payer: User, currency: str) -> int:
        items = [
            {
                "from": payer.accounts[currency],
                "to": self._target(rng, payer, currency),
                "amount": self._amount(rng),
                "idempotency_key": f"b-{payer.id}-{uuid.uuid4().hex}",
            }
            for _ in range(rng.randint(3, 5))
        ]
        path = f"/users/{payer.id}/transfers/batch"
        body = {"transfers": items}
        response = client.request("POST", path, route="batch", json=body)
        if response.status_code != 202:
            with self._lock:
                self.unexpected.append(f"POST {path} -> {response.status_code} {response.text}")
            return len(items)
        accepted = []
        for item, result in zip(items, response.json()["results"], strict=True):
            if result["status"] != 202:
                with self._lock:
                    self.unexpected.append(f"batch item {item} -> {result}")
                continue
            submitted = Submitted(
                item["idempotency_key"],
                payer.id,
                item["from"],
                item["to"],
                item["amount"],
                result["transfer"]["id"],
                "batch",
            )
            self._accepted(submitted)
            accepted.append(submitted)
        if accepted and rng.random() < self.resend_share * 3:
            again = client.request("POST", path, route="batch", json=body)
            results = again.json().get("results", []) if again.status_code == 202 else []
            by_key = {
                item["idempotency_key"]: result.get("transfer", {})
                for item, result in zip(items, results, strict=False)
            }
            for submitted in accepted:
                self._check_resend(
                    submitted,
                    again.status_code,
                    by_key.get(submitted.key, {"missing": True}),
                )
        return len(items)

    def _depositor(self) -> None:
        rng = random.Random(self.seed - 1)
        client = ApiClient(self.base_url, self.recorder, SUPERUSER_AUTH)
        try:
            while not self.stop.is_set():
                user = rng.choice(self.users)
                currency = rng.choice(("USD", "EUR"))
                key = f"d-{uuid.uuid4().hex}"
                account = user.accounts[currency]
                fields = {"amount": str(rng.randint(10, 100))}
                response = client.request(
                    "POST",
                    f"/accounts/{account}/deposits",
                    route="deposit",
                    data=fields,
                    headers={"Idempotency-Key": key},
                )
                if response.status_code != 202:
                    with self._lock:
                        self.unexpected.append(f"deposit -> {response.status_code} {response.text}")
                else:
                    self._accepted(
                        Submitted(
                            key, 1, -1, account, fields["amount"], response.json()["id"], "deposit"
                        )
                    )
                time.sleep(rng.uniform(0.5, 1.0))
        finally:
            client.close()


def register_users(base_url: str, count: int) -> list[User]:
    """`count` new users through the API, each with its accounts (one per currency)."""

    def register(index: int) -> User:
        session = requests.Session()
        try:
            username = f"chaos{index}_{secrets.token_hex(3)}"
            password = "chaos password " + secrets.token_hex(4)
            response = session.post(
                base_url + "/users",
                data={"username": username, "password": password},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            user = User(response.json()["id"], username, password)
            accounts = session.get(
                f"{base_url}/users/{user.id}/accounts", auth=user.auth, timeout=30
            )
            assert accounts.status_code == 200, accounts.text
            user.accounts = {a["currency"]: a["id"] for a in accounts.json()}
            return user
        finally:
            session.close()

    with ThreadPoolExecutor(10) as pool:
        return list(pool.map(register, range(count)))
