"""Fuzzing from the contract: schemathesis reads the app's own /openapi.json and attacks every
operation, in process (WSGI), authenticated as a real registered user and as the superuser.

Every response must be no 5xx, carry a status the document lists for that operation, and
match the documented media type, body schema and headers. A finding is either a product
bug (fix the code) or a wrong document (fix web/openapi.py or web/fields.py).

Then a stateful run follows the document's OpenAPI links (register -> accounts -> pay ->
read the transfer...), each request signed by the user that owns the path it touches.

Runtime is bounded by the example counts below: 20 to 50 s for the whole file here.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import SUPERUSER, Api, Member, read_all_pages
from web.openapi import OPERATIONS

# What the issue asks of every response; schemathesis' other checks (positive data
# acceptance and the like) judge business rules the schema cannot express.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

EXAMPLES_PER_OPERATION = 40
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    # The fixtures are module-scoped on purpose: one funded user for the whole run.
    suppress_health_check=list(HealthCheck),
)
# A long poll answers when its transfer is final or after `wait`; a pending transfer must
# not hold a fuzzing example for 30 s.
MAX_WAIT = "0.2"


def _bounded(case) -> None:
    """Keep what the fuzzer does to the shared test database within bounds.

    A long poll waits at most MAX_WAIT. A deposit creates money from the external account,
    whose balance every later test of the run shares: huge generated deposits (up to
    10^15 each) would add up towards the ledger's 64-bit limit, so they become small ones.
    """
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = MAX_WAIT
    if case.path.endswith("/deposits") and isinstance(case.body, dict):
        amount = str(case.body.get("amount", ""))
        if len(amount.split(".", maxsplit=1)[0].lstrip("0")) > 6:
            case.body["amount"] = "1.00"


@dataclass
class World:
    member: Member
    payee: Member
    transfer_id: int


@pytest.fixture(scope="module")
def world(app, settlement_worker) -> Iterator[World]:
    api = Api(app.test_client())
    member, payee = api.funded("100.00"), api.register("payee")
    sent = api.transfer(member, member.accounts["USD"], payee.accounts["USD"], "1.00")
    assert sent.status_code == 202, sent.get_json()
    assert api.wait_final(member, sent.get_json()["id"])["status"] == "settled"
    yield World(member, payee, sent.get_json()["id"])
    # The fuzzer registers webhooks to made-up hosts; the superuser's would get every
    # later test's commission events, and their retries would crowd the webhook
    # worker that tests/test_webhooks.py times.
    for user_id, auth in ((SUPERUSER.id, SUPERUSER.auth), (member.id, member.auth)):
        hooks, _ = read_all_pages(api.client, f"/users/{user_id}/webhooks", auth)
        for hook in hooks:
            gone = api.client.delete(f"/users/{user_id}/webhooks/{hook['id']}", headers=auth)
            assert gone.status_code == 204, gone.get_json()


@pytest.fixture(scope="module")
def contract(app):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def _takes_input(path: str, method: str) -> bool:
    op = next(op for op in OPERATIONS if (op.method, op.path) == (method, path))
    return "{" in path or op.body is not None or op.query is not None


CASES = [
    pytest.param(op.method.upper(), op.path, mode, id=f"{op.method.upper()} {op.path} {mode}")
    for op in OPERATIONS
    for mode in GenerationMode
    # Nothing to get wrong in a request without parameters or body.
    if mode is GenerationMode.POSITIVE or _takes_input(op.path, op.method)
]


def _own_path_parameters(world: World, path: str) -> dict[str, int] | None:
    """The member's own ids for the path's parameters: requests that get past authorization."""
    own = {
        "user_id": world.member.id,
        "account_id": world.member.accounts["USD"],
        "transfer_id": world.transfer_id,
    }
    chosen = {name: value for name, value in own.items() if "{" + name + "}" in path}
    return chosen or None


def _fuzz(contract, world: World, label: tuple[str, str, GenerationMode], auth) -> None:
    method, path, mode = label
    operation = contract[path][method]
    own = _own_path_parameters(world, path)

    @FUZZ
    @given(data=st.data())
    def examples(data) -> None:
        # Half the examples use generated path ids (mostly someone else's or nobody's),
        # half the member's own, so that the deeper code paths are reached too.
        fixed = data.draw(st.sampled_from([None, own]), label="path parameters")
        case = data.draw(operation.as_strategy(mode, path_parameters=fixed), label="case")
        _bounded(case)
        if isinstance(case.body, dict) and data.draw(st.booleans(), label="real accounts"):
            # Generated account ids almost never exist: sometimes pay between real ones.
            case.body.update({k: v for k, v in _real_accounts(world).items() if k in case.body})
        case.call_and_validate(headers=auth, checks=CHECKS)

    examples()


def _real_accounts(world: World) -> dict[str, int]:
    return {"from": world.member.accounts["USD"], "to": world.payee.accounts["USD"]}


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_operation_as_a_member(contract, world, method: str, path: str, mode) -> None:
    _fuzz(contract, world, (method, path, mode), world.member.auth)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_operation_as_the_superuser(contract, world, method: str, path: str, mode) -> None:
    _fuzz(contract, world, (method, path, mode), SUPERUSER.auth)


# --- stateful: follow the document's links ------------------------------------------------


def _basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_links_are_followed_statefully(contract, world) -> None:
    links = [
        link
        for operations in contract.raw_schema["paths"].values()
        for operation in operations.values()
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) >= 10, "the document lost its links"
    failures: list[Exception] = []
    followed: set[str] = set()
    steps = 0

    class Signed(contract.as_state_machine()):  # type: ignore[misc]
        """Each request carries the credentials of the user whose path it touches."""

        def setup(self) -> None:
            self.users: dict[int, dict[str, str]] = {world.member.id: world.member.auth}
            self.owners: dict[int, int] = {}
            self.latest = world.member.auth

        def step(self, input):
            nonlocal steps
            steps += 1
            if input.transition is not None:
                followed.add(input.transition.id)
            return super().step(input)

        def before_call(self, case) -> None:
            _bounded(case)

        def get_call_kwargs(self, case) -> dict[str, Any]:
            if case.path.endswith("/deposits"):
                return {"headers": SUPERUSER.auth}
            user_id = case.path_parameters.get("user_id")
            if user_id is None and "account_id" in case.path_parameters:
                user_id = self.owners.get(case.path_parameters["account_id"])
            return {"headers": self.users.get(user_id, self.latest)}

        def after_call(self, response, case) -> None:
            super().after_call(response, case)
            if response.status_code >= 300:
                return
            try:
                body = response.json()
            except ValueError:  # /metrics: text
                return
            if case.method == "POST" and case.path == "/users":
                self.latest = _basic(case.body["username"], case.body["password"])
                self.users[body["id"]] = self.latest
            for item in body if isinstance(body, list) else [body]:
                # An account: transfers have a kind too, but no user_id.
                if isinstance(item, dict) and "kind" in item and "user_id" in item:
                    self.owners[item["id"]] = item["user_id"]

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            try:
                case.validate_response(
                    response, checks=CHECKS, transport_kwargs=kwargs, recorder=self.recorder
                )
            except Exception as error:
                failures.append(error)
                raise

    stateful = settings(
        max_examples=30,
        stateful_step_count=8,
        deadline=None,
        database=None,
        # The server's state differs on replay (a username is taken by then...): shrinking a
        # scenario against a real database is meaningless, so generate only.
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    for _ in range(5):
        # Flaky: Hypothesis saw a choice sequence it had tried before lead elsewhere, as
        # the server remembers earlier scenarios. Not a finding by itself; a new run goes on.
        with contextlib.suppress(Flaky):
            Signed.run(settings=stateful)
        if failures:
            raise failures[0]
        if steps >= 150:
            break
    assert steps >= 100, f"only {steps} stateful steps ran"
    assert len(followed) >= 5, f"links followed: {sorted(followed)}"
