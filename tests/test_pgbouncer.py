"""The stack behind a real PgBouncer in transaction pooling mode (docs/decisions/0039).

`./run.sh pgbouncer` (ops/pgbouncer.py) runs Debian's pgbouncer in front of a database
of this module's own, migrated directly; gunicorn, a Celery worker and beat, each a real
process started by the commands compose runs, reach it only through the pooler, with
DATABASE_POOLER=pgbouncer and a server pool smaller than the requests in flight.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from common.db import connect_args
from common.ledger import SETTLEMENT_LOCK_CLASS
from common.migrate import migrate
from common.settings import ConfigurationError, Settings, settings_from
from ops import debian, services
from ops import pgbouncer as pooler
from ops.servers import free_port, port_open
from ops.supervisor import Process
from tests.conftest import (
    TEST_DATABASE,
    Api,
    Member,
    _claim_redis_db,
    _release_redis_db,
)
from tests.servers import ROOT, environment

# Server connections PgBouncer keeps per database and user: fewer than web threads.
POOL_SIZE = 4
WEB_PROCESSES, WEB_THREADS = 2, 8
CLIENTS = 24
PAYERS = 8
TRANSFERS_EACH = 20
# Seconds a client may sit idle inside a transaction before PgBouncer ends it.
IDLE_TIMEOUT_S = 2
# What the pooler makes of session state it cannot carry between transactions.
# application_name of the test's own connections to PostgreSQL itself.
PROBE = "pgbouncer-test-probe"
POOLER_FAILURES = ("prepared statement", "unsupported startup parameter", "Traceback")


# --- the configuration, without a pooler running --------------------------------------------


def test_a_pooler_turns_prepared_statements_and_startup_options_off() -> None:
    direct = connect_args(settings_from())
    assert "idle_in_transaction_session_timeout" in direct["options"]
    assert "prepare_threshold" not in direct
    pooled = connect_args(settings_from(database_pooler="pgbouncer"))
    assert pooled["prepare_threshold"] is None
    assert "options" not in pooled
    with pytest.raises(ConfigurationError, match="DATABASE_POOLER"):
        settings_from(database_pooler="pgpool")


def test_the_written_configuration_pools_transactions(tmp_path: Path) -> None:
    upstream = pooler.Upstream.from_url("postgresql+psycopg://remit:s%22cret@db:5433/remit")
    assert (upstream.host, upstream.port, upstream.user, upstream.password) == (
        "db",
        5433,
        "remit",
        's"cret',
    )
    ini = pooler.write(pooler.Config(upstream, pool_size=7), tmp_path / "conf")
    written = ini.read_text()
    for line in (
        "* = host=db port=5433",
        "pool_mode = transaction",
        "default_pool_size = 7",
        "auth_type = scram-sha-256",
        "idle_transaction_timeout = 30",
    ):
        assert line in written.splitlines(), line
    auth_file = tmp_path / "conf" / "userlist.txt"
    assert auth_file.read_text() == '"remit" "s""cret"\n'
    assert auth_file.stat().st_mode & 0o077 == 0
    assert "server_tls_sslmode" not in written
    trusted = pooler.Upstream.from_url("postgres://postgres@127.0.0.1/remit?sslmode=require")
    trusting = pooler.ini_text(pooler.Config(trusted), auth_file).splitlines()
    assert {"auth_type = trust", "server_tls_sslmode = require"} <= set(trusting)


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("PGBOUNCER_PORT", "many", "PGBOUNCER_PORT must be a number"),
        ("PGBOUNCER_POOL_SIZE", "0", "PGBOUNCER_POOL_SIZE must be at least 1"),
        ("DATABASE_URL", "redis://127.0.0.1/0", "DATABASE_URL must be a postgresql:// URL"),
    ],
)
def test_a_bad_setting_stops_the_command_with_one_line(
    variable: str, value: str, complaint: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ops", "pgbouncer"],
        cwd=ROOT,
        env=environment(**{variable: value}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"remit: {complaint}"), line


# --- the stack through the pooler -----------------------------------------------------------


class Http:
    """The Flask test client's calls (what `Api` makes), over HTTP to the real gunicorn."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = requests.request(method, self.base_url + path, timeout=30, **kwargs)
        response.get_json = response.json  # type: ignore[attr-defined]
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self._call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self._call("POST", path, **kwargs)


@dataclass
class Pooled:
    direct_url: str
    database: str
    pgbouncer_port: int
    api: Api
    processes: dict[str, Process]
    logs: Path

    def direct(self) -> psycopg.Connection[Any]:
        """A connection to PostgreSQL itself, for the test's own looks."""
        url = make_url(self.direct_url).set(drivername="postgresql")
        return psycopg.connect(
            url.render_as_string(hide_password=False), autocommit=True, application_name=PROBE
        )

    def through_pooler(self, **kwargs: Any) -> psycopg.Connection[Any]:
        url = make_url(self.direct_url).set(drivername="postgresql", port=self.pgbouncer_port)
        return psycopg.connect(
            url.render_as_string(hide_password=False), prepare_threshold=None, **kwargs
        )

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Process:
    process = Process(name, argv, env, log=logs / f"{name}.log")
    process.start()
    return process


def _wait(condition: Any, what: str, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.alive(), f"{process.name} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _drop_database(direct_url: str, database: str) -> None:
    admin = create_engine(
        make_url(direct_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": database},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{database}"'))
    admin.dispose()


@pytest.fixture(scope="module")
def pooled(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pooled]:
    if not debian.ensure("pgbouncer"):
        pytest.skip("pgbouncer is not installed and could not be (apt-get install pgbouncer)")
    logs = tmp_path_factory.mktemp("pgbouncer-stack")
    # Its own database, migrated directly (never through the pooler), and its own Redis
    # DB: the suite's in-process worker must not take this stack's doorbells.
    database = f"{TEST_DATABASE}_pgbouncer"
    direct_url = make_url(settings.database_url).set(database=database)
    direct = direct_url.render_as_string(hide_password=False)
    migrate(direct, settings)
    redis_url = settings.redis_url.rsplit("/", 1)[0] + f"/{_claim_redis_db(settings.redis_url)}"
    port = free_port()
    processes: dict[str, Process] = {}
    try:
        processes["pgbouncer"] = bouncer = _start(
            "pgbouncer",
            [sys.executable, "-m", "ops", "pgbouncer"],
            environment(
                DATABASE_URL=direct,
                PGBOUNCER_LISTEN_ADDR="127.0.0.1",
                PGBOUNCER_PORT=str(port),
                PGBOUNCER_POOL_SIZE=str(POOL_SIZE),
                PGBOUNCER_MAX_CLIENT_CONN="500",
                DB_IDLE_IN_TRANSACTION_TIMEOUT=str(IDLE_TIMEOUT_S),
            ),
            logs,
        )
        _wait(lambda: port_open(port), "PgBouncer to listen", bouncer, 30)

        def env(name: str) -> dict[str, str]:
            return environment(
                DATABASE_URL=direct_url.set(port=port).render_as_string(hide_password=False),
                DATABASE_POOLER="pgbouncer",
                REDIS_URL=redis_url,
                REMIT_APP_NAME=f"remit-{name}",
                REMIT_LOG_SETUP="1",
                LOG_LEVEL="INFO",
                WEB_CONCURRENCY=str(WEB_PROCESSES),
                WEB_THREADS=str(WEB_THREADS),
                DB_POOL_SIZE=None,
                WORKER_CONCURRENCY="2",
                SWEEP_INTERVAL="1",
                PROMETHEUS_MULTIPROC_DIR=str(logs / "metrics"),
            )

        web_port = free_port()
        (logs / "metrics").mkdir()
        processes["web"] = web = _start(
            "web", services.command("web", bind=f"127.0.0.1:{web_port}"), env("web"), logs
        )
        processes["worker"] = worker = _start(
            "worker",
            services.command("worker", hostname=f"pgbouncer-{secrets.token_hex(3)}@%h"),
            env("worker"),
            logs,
        )
        processes["webhooks"] = _start(
            "webhooks",
            services.command("webhooks", hostname=f"pgbouncer-webhooks-{secrets.token_hex(3)}@%h"),
            env("webhooks"),
            logs,
        )
        processes["beat"] = _start(
            "beat",
            services.command("beat", schedule=logs / "beat-schedule"),
            env("beat"),
            logs,
        )
        base_url = f"http://127.0.0.1:{web_port}"
        _wait(lambda: _answers(base_url + "/health"), "the API to answer", web)
        stack = Pooled(direct, database, port, Api(Http(base_url)), processes, logs)
        _wait(lambda: " ready." in stack.log("worker"), "the worker to be ready", worker)
        yield stack
    finally:
        for process in reversed(processes.values()):
            process.stop(timeout=20)
        shutil.rmtree(Path(tempfile.gettempdir()) / f"remit-pgbouncer-{port}", ignore_errors=True)
        _drop_database(direct, database)
        with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
            client.flushdb()
        _release_redis_db(redis_url)


class Peaks:
    """Samples, while the load runs, the server connections PostgreSQL holds for the
    database and the clients PgBouncer serves or keeps waiting."""

    def __init__(self, stack: Pooled) -> None:
        self.stack = stack
        self.servers = 0
        self.seen: list[tuple[Any, ...]] = []
        self.clients = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # PgBouncer's console speaks the simple query protocol only: no parameters.
        with (
            self.stack.direct() as connection,
            self.stack.through_pooler(dbname="pgbouncer", autocommit=True) as console,
        ):
            while not self._stop.is_set():
                rows = connection.execute(
                    "SELECT client_port, application_name FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name <> %s",
                    (self.stack.database, PROBE),
                ).fetchall()
                if len(rows) > self.servers:
                    self.servers, self.seen = len(rows), rows
                pools = console.execute("SHOW POOLS")
                columns = [column.name for column in pools.description or []]
                database, active, waiting = (
                    columns.index(name) for name in ("database", "cl_active", "cl_waiting")
                )
                clients = sum(
                    row[active] + row[waiting]
                    for row in pools.fetchall()
                    if row[database] == self.stack.database
                )
                self.clients = max(self.clients, clients)
                time.sleep(0.02)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _pending(stack: Pooled) -> int:
    with stack.direct() as connection:
        row = connection.execute(
            "SELECT count(*) FROM transfers WHERE status = 'pending'"
        ).fetchone()
    return row[0] if row else 0


def _wait_settled(stack: Pooled, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while _pending(stack):
        assert time.monotonic() < deadline, "transfers still pending through the pooler"
        time.sleep(0.2)


def _hold_leaves(api: Api, member: Member, path: str, status: str) -> dict[str, Any]:
    """The hold once its status is no longer `status` (long polls, as clients wait)."""
    deadline = time.monotonic() + 20
    while True:
        hold: dict[str, Any] = api.client.get(path + "?wait=5", headers=member.auth).json()
        if hold["status"] != status:
            return hold
        assert time.monotonic() < deadline, hold


def _audit(stack: Pooled) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "audit"],
        cwd=ROOT,
        env=environment(DATABASE_URL=stack.direct_url, REMIT_LOG_SETUP="0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_transfers_refunds_and_holds_settle_once_through_the_pooler(pooled: Pooled) -> None:
    api = pooled.api
    payers = [api.funded("1000.00") for _ in range(PAYERS)]
    usd = [payer.accounts["USD"] for payer in payers]

    def target(payer: int, round_: int) -> int:
        return usd[(payer + 1 + round_ % (PAYERS - 1)) % PAYERS]

    def send(payer: int, to: int, key: str) -> requests.Response:
        return api.client.post(
            f"/users/{payers[payer].id}/transfers",
            data={"from": usd[payer], "to": to, "amount": "10.00"},
            headers={**payers[payer].auth, "Idempotency-Key": key},
        )

    def pay(job: tuple[int, int]) -> tuple[int, int, int, str]:
        payer, round_ = job
        key = f"pgb-{payer}-{round_}-{secrets.token_hex(4)}"
        to = target(payer, round_)
        response = send(payer, to, key)
        assert response.status_code == 202, response.text
        return response.json()["id"], payer, to, key

    jobs = [(payer, round_) for round_ in range(TRANSFERS_EACH) for payer in range(PAYERS)]
    with Peaks(pooled) as peaks, ThreadPoolExecutor(CLIENTS) as pool:
        accepted = list(pool.map(pay, jobs))
        # Replays answer with the transfer already made, never a second one.
        for transfer_id, payer, to, key in accepted[:CLIENTS]:
            again = send(payer, to, key)
            assert again.status_code in (200, 202), again.text
            assert again.json()["id"] == transfer_id
        _wait_settled(pooled)
    assert len({transfer_id for transfer_id, *_ in accepted}) == len(jobs)
    # More requests in flight than server connections: PgBouncer multiplexed them.
    assert peaks.clients > POOL_SIZE, peaks.clients
    assert peaks.servers <= POOL_SIZE, peaks.seen

    # Each paid 20 x (10.00 + 0.10 commission) and was paid 20 x 10.00.
    for payer in payers:
        assert api.balance(payer, payer.accounts["USD"]) == "998.00"
    for transfer_id, payer, *_ in accepted[:: len(accepted) // 10]:
        assert api.wait_final(payers[payer], transfer_id)["status"] == "settled"

    # A refund of payer 0's first payment (to payer 1), by its payee.
    first_id, _, to, _ = accepted[0]
    assert to == usd[1]
    refund = api.client.post(
        f"/users/{payers[1].id}/transfers/{first_id}/refunds", data={}, headers=payers[1].auth
    )
    assert refund.status_code == 202, refund.text
    assert api.wait_final(payers[1], refund.json()["id"])["status"] == "settled"
    assert api.get_transfer(payers[0], first_id)["refunded"] == "10.00"

    # A hold from payer 2 to payer 3, held, then captured in full.
    holder, receiver = payers[2], payers[3]
    hold = api.client.post(
        f"/users/{holder.id}/holds",
        json={"from": holder.accounts["USD"], "to": receiver.accounts["USD"], "amount": "10.00"},
        headers=holder.auth,
    )
    assert hold.status_code == 202, hold.text
    hold_path = f"/users/{holder.id}/holds/{hold.json()['id']}"
    assert _hold_leaves(api, holder, hold_path, "pending")["status"] == "held"
    captured = api.client.post(hold_path + "/capture", json={}, headers=holder.auth)
    assert captured.status_code == 202, captured.text
    capture = api.wait_final(holder, captured.json()["transfer_id"])
    assert capture["status"] == "settled", capture
    assert _hold_leaves(api, holder, hold_path, "held")["status"] == "captured"

    expected = {0: "1008.00", 1: "988.00", 2: "987.90", 3: "1008.00"}
    for index, payer in enumerate(payers):
        shown = api.balance(payer, payer.accounts["USD"])
        assert shown == expected.get(index, "998.00"), (index, shown)

    _wait_settled(pooled)
    _audit(pooled)
    for name in ("web", "worker", "webhooks", "beat"):
        log = pooled.log(name)
        for failure in POOLER_FAILURES:
            assert failure not in log, f"{name}: {failure}\n{log[-3000:]}"
    assert "unsupported startup parameter" not in pooled.log("pgbouncer")


def test_a_client_frozen_inside_a_transaction_loses_its_locks(pooled: Pooled) -> None:
    """A frozen settler holding a currency's settlement lock: PgBouncer ends it after the
    idle-in-transaction timeout (the server connection and its locks with it), and the
    sweep settles what waited."""
    api = pooled.api
    payer, payee = api.funded("100.00"), api.register()
    frozen = pooled.through_pooler()
    frozen.execute("SELECT pg_advisory_xact_lock(%s, hashtext('USD'))", (SETTLEMENT_LOCK_CLASS,))
    started = time.monotonic()
    response = api.transfer(payer, payer.accounts["USD"], payee.accounts["USD"], "1.00")
    assert response.status_code == 202, response.text
    settled = api.wait_final(payer, response.json()["id"], timeout=30)
    assert settled["status"] == "settled", settled
    assert time.monotonic() - started >= IDLE_TIMEOUT_S * 0.9
    with pytest.raises(psycopg.Error):
        frozen.execute("SELECT 1")
    frozen.close()
    assert "idle transaction timeout" in pooled.log("pgbouncer")
