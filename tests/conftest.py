"""Test fixtures on the real thing: a fresh PostgreSQL database per run (schema from
the Alembic migrations), a Redis DB number of its own, and a real Celery worker
(threads, in-process) consuming from that Redis.

Importing this module reads nothing and connects to nothing: the unit tests
(tests/unit) need no service. The integration environment (the run's database name,
its claimed Redis DB, the settings) is made once, by `integration_settings()`: the
session fixture `settings` hands it to the tests, and `pytest_collectstart` makes it
before the first integration module is imported, because a test module may import an
entry point (worker.app, the Celery CLI's) that loads the process's settings.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from xdist.scheduler import LoadScopeScheduling

from common.db import dispose_engine, script_session
from common.migrate import migrate
from common.settings import Settings, load_settings, use_settings
from tests import properties  # noqa: F401 - registers hypothesis' quick profile early

RUN_ID = f"{time.strftime('%Y%m%d%H%M%S')}_{os.getpid()}_{secrets.token_hex(2)}"
TEST_DATABASE = f"remit_test_{RUN_ID}"
ROOT = Path(__file__).resolve().parent.parent
UNIT_TESTS = ROOT / "tests" / "unit"
SUPERUSER_PASSWORD = "superuser-test-password"
CLAIM_KEY = "remit:test-run"
CLAIM = f"{socket.gethostname()}:{os.getpid()}:{RUN_ID}"


def _claimant_is_gone(claim: bytes | None) -> bool:
    """A claim is "host:pid:run"; on this host, a claimant whose process is gone (killed,
    crashed before its atexit ran) holds the DB for nobody."""
    if claim is None:
        return True
    host, _, rest = claim.decode(errors="replace").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _claim_redis_db(base_url: str) -> int:
    """A Redis DB number no other test run is using: DB 0 is left to the developer's own
    stack; a run claims one of 1-15 with an atomic SET NX, so two runs at once (a
    developer and CI, say) never consume each other's doorbells. A claim left by a
    process that no longer exists is taken over."""
    root = base_url.rsplit("/", 1)[0]
    for number in range(1, 16):
        client = redis.Redis.from_url(f"{root}/{number}")
        try:
            if client.set(CLAIM_KEY, CLAIM, nx=True, ex=2 * 3600):
                return number
            old = client.get(CLAIM_KEY)
            # GET-and-SET only if the stale claim is still the one we read: two runs
            # taking over the same stale DB at once cannot both win.
            if _claimant_is_gone(old) and client.set(CLAIM_KEY, CLAIM, xx=True, get=True) == old:
                client.flushdb()
                client.set(CLAIM_KEY, CLAIM, ex=2 * 3600)
                return number
        finally:
            client.close()
    raise RuntimeError("every Redis DB 1-15 is claimed by another live test run")


def _release_redis_db(redis_url: str) -> None:
    # A run that never flushes its DB (--collect-only, an interrupted run) must not hold
    # one of the 15 for two hours.
    client = redis.Redis.from_url(redis_url)
    try:
        if client.get(CLAIM_KEY) == CLAIM.encode():
            client.delete(CLAIM_KEY)
    except redis.RedisError:
        pass
    finally:
        client.close()


_integration: Settings | None = None


def integration_settings() -> Settings:
    """The integration tests' settings, made once per run: its own database (named
    here, created by the `database` fixture), a Redis DB claimed for it, and cheap,
    short knobs. Also put in the environment, which the processes the tests start
    (gunicorn, Flower, run.sh) inherit, and made the process's (use_settings)."""
    global _integration  # noqa: PLW0603 - once per test run
    if _integration is not None:
        return _integration
    base_database_url = os.environ.get(
        "DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    base_redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    redis_url = base_redis_url.rsplit("/", 1)[0] + f"/{_claim_redis_db(base_redis_url)}"
    atexit.register(_release_redis_db, redis_url)
    os.environ.update(
        {
            "REMIT_ENV": "test",
            "DATABASE_URL": make_url(base_database_url)
            .set(drivername="postgresql+psycopg", database=TEST_DATABASE)
            .render_as_string(hide_password=False),
            "REDIS_URL": redis_url,
            "SUPERUSER_PASSWORD": SUPERUSER_PASSWORD,
            "SECRET_KEY": secrets.token_hex(32),
            # Cheap hashes keep hundreds of registrations fast; the algorithm is the same.
            "ARGON2_TIME_COST": "1",
            "ARGON2_MEMORY_KIB": "1024",
            # Sweeps in tests are triggered by hand; a short age makes stuck rows eligible.
            "SWEEP_PENDING_AFTER": "1",
            "WORKER_CONCURRENCY": "4",
            "REMIT_LOG_SETUP": "0",
            # A short failure lifecycle: 3 attempts, failed transfers retried after 1 s.
            "SETTLE_MAX_ATTEMPTS": "3",
            "FAILED_RETRY_INTERVAL": "1",
            # Small batches so concurrency tests see many batches, not one.
            "SETTLE_BATCH_SIZE": "50",
            # Webhook retries in fractions of a second, short attempts and leases.
            "WEBHOOK_TIMEOUT": "2",
            "WEBHOOK_RETRY_BASE": "0.2",
            "WEBHOOK_RETRY_CAP": "1",
            "WEBHOOK_LEASE": "4",
            "WEBHOOK_SWEEP_INTERVAL": "0.5",
            "WEBHOOK_CONCURRENCY": "8",
            # Every test registers from 127.0.0.1, and many register or log in from
            # threads at once: tests/test_overload.py sets its own limit and takes every
            # hashing slot itself.
            "REGISTRATIONS_PER_ADDRESS": "1000000",
            "HASH_CONCURRENCY": "64",
        }
    )
    _integration = use_settings(load_settings())
    return _integration


def pytest_collectstart(collector: pytest.Collector) -> None:
    if isinstance(collector, pytest.Module) and UNIT_TESTS not in collector.path.resolve().parents:
        integration_settings()


# Tests that start servers of their own and load both cores: under xdist (ops runs the
# whole suite so, docs/decisions/0047) one process runs them one after another, first,
# while the others share out the remaining files.
HEAVY = (
    "tests/chaos/",
    "tests/multihost/",
    "tests/test_bench_smoke.py",
    "tests/test_soak_smoke.py",
)


class HeavyInOneProcess(LoadScopeScheduling):
    """xdist's scheduling by file, with the heavy files one scope."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return "heavy" if path.startswith(HEAVY) else path


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> HeavyInOneProcess:
    return HeavyInOneProcess(config, log)


# What the fault suites wrote about this run, printed at its end (no -s needed).
SUMMARIES = {
    "chaos summary": ROOT / ".run" / "chaos-summary.txt",
    "multi-host summary": ROOT / ".run" / "multihost-summary.txt",
}
_STARTED = time.time()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, path in SUMMARIES.items():
        if not path.exists() or path.stat().st_mtime < _STARTED:
            continue
        terminalreporter.section(title)
        for line in path.read_text().splitlines()[1:]:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(also in {path.relative_to(ROOT)})")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return integration_settings()


@pytest.fixture(scope="session", autouse=True)
def database(settings: Settings) -> Iterator[str]:
    """The run's own database, built by the migrations, dropped at the end."""
    url = settings.database_url
    migrate(url, settings)
    yield url
    dispose_engine()
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": TEST_DATABASE},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_client(settings: Settings):
    client = redis.Redis.from_url(settings.redis_url)
    # Leftovers of a crashed earlier run in this DB; then claim it again.
    client.flushdb()
    client.set(CLAIM_KEY, CLAIM, ex=2 * 3600)
    yield client
    # Flushing also releases the claim for the next run.
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def celery_app_for_tests(redis_client):
    # Imported once the run's settings are the process's: it reads them at import.
    from worker.app import app as celery_app  # noqa: PLC0415

    return celery_app


@pytest.fixture(scope="session")
def settlement_worker(celery_app_for_tests):
    """A real Celery worker (thread pool) consuming the run's Redis queue.

    pytest-celery's own worker fixtures drive Docker containers; none runs here,
    so the worker is celery.contrib.testing's in-process one, against real Redis.
    """
    with start_worker(
        celery_app_for_tests,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        shutdown_timeout=30,
        loglevel="WARNING",
    ) as worker:
        yield worker


class WebhookWorker:
    """The delivery worker as it runs in production: a real `./run.sh webhooks` process
    (services.command), its JSON log (DEBUG) in a file the tests read."""

    def __init__(self, celery_app: Any, log_dir: Path) -> None:
        from ops import services  # noqa: PLC0415 - only the tests that use it load ops
        from ops.supervisor import Process  # noqa: PLC0415

        self.celery_app = celery_app
        self.name = f"webhooks@{socket.gethostname()}"
        env = {**os.environ, "REMIT_LOG_SETUP": "1", "LOG_LEVEL": "DEBUG"}
        self.log_path = log_dir / "webhooks.log"
        self.process = Process(
            "webhooks",
            services.command("webhooks", hostname=self.name),
            env,
            log=self.log_path,
        )

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 60
        while not self.celery_app.control.ping(destination=[self.name], timeout=0.5):
            assert self.process.alive(), self.log()
            assert time.monotonic() < deadline, "the webhook worker did not answer in 60 s"

    def kill(self) -> None:
        """SIGKILL, its thread pool and all (one process)."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        self.process.stop(20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def webhook_worker(celery_app_for_tests, database, tmp_path_factory) -> Iterator[WebhookWorker]:
    """The webhook delivery worker: a real process consuming the webhooks queue."""
    worker = WebhookWorker(celery_app_for_tests, tmp_path_factory.mktemp("webhook-worker"))
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _no_login_throttle_carry_over(redis_client) -> None:
    # One test's failed logins must not throttle the next test (all come from 127.0.0.1).
    for key in redis_client.scan_iter("remit:login-failures:*"):
        redis_client.delete(key)


@pytest.fixture(scope="session")
def app(database, settings: Settings):
    from web.app import create_app  # noqa: PLC0415 - see celery_app_for_tests

    flask_app = create_app(settings)
    flask_app.testing = True
    return flask_app


@pytest.fixture
def client(app):
    return app.test_client()


PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body.keys() >= PROBLEM_MEMBERS, body
    assert body["status"] == status
    assert body["code"] == code
    assert all(isinstance(body[member], str) and body[member] for member in ("type", "title"))
    assert isinstance(body["detail"], str)
    return body


NEXT_LINK = re.compile(r'^<([^>]+)>; rel="next"$')


def next_page(response) -> str | None:
    """The path and query of the Link rel="next" header, or None on the last page."""
    link = response.headers.get("Link")
    if link is None:
        return None
    match = NEXT_LINK.match(link)
    assert match, link
    url = urlsplit(match[1])
    return f"{url.path}?{url.query}"


def read_all_pages(client, path: str, auth: dict[str, str]) -> tuple[list[dict], int]:
    """Every item of a listing by following Link headers; also the number of pages."""
    items: list[dict] = []
    pages = 0
    next_path: str | None = path
    while next_path is not None:
        response = client.get(next_path, headers=auth)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        pages += 1
        assert pages < 100, "pagination does not end"
        items.extend(page)
        next_path = next_page(response)
        if next_path is not None:
            assert page, "a Link to a next page after an empty page"
    return items, pages


@contextlib.contextmanager
def settlement_held(currency: str) -> Iterator[None]:
    """Nothing of `currency` settles inside the block: the test holds its settlement lock
    (doorbells find it taken and leave the work to the holder). On leaving, the test does
    what a settler holding the lock does before it lets go: it looks again, here by
    ringing, so that nothing is left for a later test's doorbell to find."""
    from common.doorbells import ring  # noqa: PLC0415 - no import at collection
    from common.ledger import SETTLEMENT_LOCK_CLASS  # noqa: PLC0415

    params = {"cls": SETTLEMENT_LOCK_CLASS, "currency": currency}
    with script_session() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:cls, hashtext(:currency))"), params)
        try:
            yield
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:cls, hashtext(:currency))"), params)
            holder.commit()
            ring(currency)


def settlement_state() -> list[str]:
    """What settlement is doing right now, for a test that waited in vain: the doorbell
    marks and queues in Redis, the advisory locks and lock waits in PostgreSQL, and the
    transfers still pending."""
    settings = integration_settings()
    lines: list[str] = []
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    try:
        for key in sorted(client.keys("remit:doorbell*") + client.keys("remit:settling:*")):
            lines.append(f"redis {key.decode()} ttl={client.ttl(key)}")
        lines.append(f"redis celery queue={client.llen('celery')} unacked={client.hlen('unacked')}")
    except redis.RedisError as error:
        lines.append(f"redis: {error!r}")
    finally:
        client.close()
    with script_session() as session, session.begin():
        rows = session.execute(
            text(
                "SELECT a.pid, l.locktype, l.granted, a.application_name, a.state,"
                " a.wait_event_type, a.wait_event, now() - a.xact_start AS xact_age,"
                " left(a.query, 100) AS query"
                " FROM pg_stat_activity a LEFT JOIN pg_locks l"
                "  ON l.pid = a.pid AND (l.locktype = 'advisory' OR NOT l.granted)"
                " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
                " AND (l.pid IS NOT NULL OR a.state LIKE 'idle in%')"
            )
        )
        lines += [f"pg {dict(row._mapping)}" for row in rows]
        due = session.execute(
            text(
                "SELECT id, kind, currency, attempts, next_attempt_at, created_at"
                " FROM transfers WHERE status = 'pending' ORDER BY id LIMIT 20"
            )
        )
        lines += [f"pending {tuple(row)}" for row in due]
    return lines


def sweep_until(predicate: Callable[[], object], timeout: float = 30) -> None:
    """Run beat's sweep (as beat would, every ~second) until predicate() holds."""
    from worker.tasks import sweep  # noqa: PLC0415 - the worker's code only where used

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        sweep.apply()
        time.sleep(0.5)


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


_usernames = itertools.count(1)


@dataclass
class Member:
    id: int
    username: str
    password: str
    accounts: dict[str, int] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return basic_auth(self.username, self.password)


SUPERUSER = Member(1, "superuser", SUPERUSER_PASSWORD)


class Api:
    """Shortcuts for the common setups; every call goes through the real HTTP routes."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def register(self, prefix: str = "user") -> Member:
        username = f"{prefix}{next(_usernames)}_{secrets.token_hex(3)}"
        password = "correct horse " + secrets.token_hex(4)
        response = self.client.post("/users", data={"username": username, "password": password})
        assert response.status_code == 201, response.get_json()
        member = Member(response.get_json()["id"], username, password)
        accounts = self.client.get(f"/users/{member.id}/accounts", headers=member.auth)
        assert accounts.status_code == 200, accounts.get_json()
        member.accounts = {a["currency"]: a["id"] for a in accounts.get_json()}
        return member

    def deposit(self, account_id: int, amount: str, **headers: str) -> dict[str, Any]:
        response = self.client.post(
            f"/accounts/{account_id}/deposits",
            data={"amount": amount},
            headers={**SUPERUSER.auth, **headers},
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    def transfer(self, payer: Member, source: int, target: int, amount: str, **extra: str) -> Any:
        return self.client.post(
            f"/users/{payer.id}/transfers",
            data={"from": source, "to": target, "amount": amount, **extra},
            headers=payer.auth,
        )

    def get_transfer(self, member: Member, transfer_id: int) -> dict[str, Any]:
        response = self.client.get(
            f"/users/{member.id}/transfers/{transfer_id}", headers=member.auth
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def wait_final(self, member: Member, transfer_id: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            transfer = self.get_transfer(member, transfer_id)
            if transfer["status"] != "pending":
                return transfer
            if time.monotonic() > deadline:
                # Shown with the test's failure: what held the transfer up.
                print(f"transfer {transfer_id} still pending after {timeout} s:")
                for line in settlement_state():
                    print("  " + line)
                return transfer
            time.sleep(0.05)

    def balance(self, member: Member, account_id: int) -> str:
        response = self.client.get(f"/accounts/{account_id}", headers=member.auth)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["balance"]

    def funded(self, amount: str = "1000.00", currency: str = "USD") -> Member:
        """A new user whose `currency` account holds `amount` (deposit settled)."""
        member = self.register()
        deposit = self.deposit(member.accounts[currency], amount)
        settled = self.wait_final(SUPERUSER, deposit["id"])
        assert settled["status"] == "settled", settled
        return member


@pytest.fixture
def api(client, settlement_worker) -> Api:
    return Api(client)


@pytest.fixture
def poison() -> Iterator[Any]:
    """poison(id) makes settling transfer `id` raise inside PostgreSQL; cure(id) stops it."""
    with script_session() as session, session.begin():
        session.execute(text("CREATE TABLE IF NOT EXISTS test_poisoned (id bigint PRIMARY KEY)"))
        session.execute(
            text(
                """
                CREATE OR REPLACE FUNCTION test_poison() RETURNS trigger AS $$
                BEGIN
                  IF EXISTS (SELECT 1 FROM test_poisoned WHERE id = NEW.transfer_id) THEN
                    RAISE EXCEPTION 'poisoned transfer %', NEW.transfer_id;
                  END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql
                """
            )
        )
        session.execute(
            text(
                "CREATE OR REPLACE TRIGGER test_poison BEFORE INSERT ON postings "
                "FOR EACH ROW EXECUTE FUNCTION test_poison()"
            )
        )

    class Poison:
        def __call__(self, transfer_id: int) -> None:
            with script_session() as session, session.begin():
                session.execute(text("INSERT INTO test_poisoned VALUES (:id)"), {"id": transfer_id})

        def cure(self, transfer_id: int) -> None:
            with script_session() as session, session.begin():
                session.execute(
                    text("DELETE FROM test_poisoned WHERE id = :id"), {"id": transfer_id}
                )

    yield Poison()
    with script_session() as session, session.begin():
        session.execute(text("DROP TRIGGER test_poison ON postings"))
        session.execute(text("DROP TABLE test_poisoned"))
