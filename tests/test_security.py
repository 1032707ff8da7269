"""Secrets and hygiene: production refuses to start without real secrets, Flower is always
behind a password, logs never hold passwords or Authorization headers, an internal error is
a problem+json without a stack trace, no server announces its version, and passwords are
hashed with the documented argon2id cost.

Every process here is the real one (migrate, run.sh, gunicorn, Flower) on the real
database and broker; the database error is a real one, raised by a PostgreSQL trigger.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import gunicorn
import pytest
import requests
from argon2 import Type, extract_parameters
from sqlalchemy import text

from common.db import script_session
from common.logs import json_formatter
from tests.conftest import SUPERUSER, Api, assert_problem, basic_auth
from tests.servers import GUNICORN, ROOT, environment, free_port, gunicorn_command, serving

GOOD_KEY = "k" * 64


# --- production refuses to start without real secrets -------------------------------------
# (The settings' own refusals are unit tests: tests/unit/test_settings.py.)

PRODUCTION_WITHOUT_SECRETS = {
    "REMIT_ENV": "production",
    "SUPERUSER_PASSWORD": None,
    "SECRET_KEY": None,
    # Nothing may be reached before the refusal: these would fail loudly if it were.
    "DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
    "REDIS_URL": "redis://127.0.0.1:9/0",
    # run.sh: use .venv's programs from PATH, never (re)install anything.
    "REMIT_USE_SYSTEM_PYTHON": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}
ONE_LINE = "remit: SUPERUSER_PASSWORD is required when REMIT_ENV=production"


def _refusal(command: list[str], **changes: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        env=environment(**{**PRODUCTION_WITHOUT_SECRETS, **changes}),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "worker.cli", "migrate"],
        ["bash", "run.sh", "migrate"],
        ["bash", "run.sh", "web"],
        ["bash", "run.sh", "worker"],
        ["bash", "run.sh", "beat"],
        ["bash", "run.sh", "flower"],
        [GUNICORN, "--config", "python:web.gunicorn_conf", "web.wsgi:app"],
    ],
    ids=["migrate", "run.sh migrate", "web", "worker", "beat", "flower", "gunicorn"],
)
def test_production_without_secrets_refuses_to_start_with_one_line(command) -> None:
    result = _refusal(command)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == [ONE_LINE]


def test_production_without_a_secret_key_says_so(tmp_path) -> None:
    result = _refusal(["bash", "run.sh", "web"], SUPERUSER_PASSWORD="a-real-password")
    assert result.returncode == 2
    assert result.stderr.strip() == "remit: SECRET_KEY is required when REMIT_ENV=production"


# --- Flower is always behind a password ---------------------------------------------------

PRODUCTION_SECRETS = {"SUPERUSER_PASSWORD": "a-real-password", "SECRET_KEY": GOOD_KEY}


@pytest.mark.parametrize(
    ("flower_env", "complaint"),
    [
        ({}, "Flower needs a password when REMIT_ENV=production"),
        ({"FLOWER_USER": "operator"}, "set both FLOWER_USER and FLOWER_PASSWORD"),
        ({"FLOWER_BASIC_AUTH": "no-colon"}, "must be user:password"),
        ({"FLOWER_BASIC_AUTH": "operator:"}, "must be user:password"),
        ({"FLOWER_USER": "operator", "FLOWER_PASSWORD": "change-me-flower"}, "placeholder"),
    ],
)
def test_flower_refuses_to_start_without_a_real_password(flower_env, complaint) -> None:
    unset = {"FLOWER_BASIC_AUTH": None, "FLOWER_USER": None, "FLOWER_PASSWORD": None}
    result = _refusal(["bash", "run.sh", "flower"], **{**PRODUCTION_SECRETS, **unset, **flower_env})
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert complaint in line


@pytest.fixture
def development_flower(tmp_path) -> Iterator[tuple[str, str]]:
    """`./run.sh flower` in development with no FLOWER_* set: its URL and the line it printed."""
    port = free_port()
    log = tmp_path / "flower.log"
    env = environment(
        REMIT_ENV="development",
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH=None,
        FLOWER_USER=None,
        FLOWER_PASSWORD=None,
        REMIT_USE_SYSTEM_PYTHON="1",
        PATH=PRODUCTION_WITHOUT_SECRETS["PATH"],
    )
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", "run.sh", "flower"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                requests.get(url + "/healthcheck", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url, log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_development_flower_gets_a_random_password_printed_once(development_flower) -> None:
    url, output = development_flower
    logins = re.findall(r"Flower login for this run: (\S+) / (\S+)", output)
    assert len(logins) == 1, output
    user, password = logins[0]
    assert len(password) >= 20
    assert requests.get(url + "/api/workers", timeout=10).status_code == 401
    wrong = requests.get(url + "/api/workers", auth=(user, password + "x"), timeout=10)
    assert wrong.status_code == 401
    assert requests.get(url + "/api/workers", auth=(user, password), timeout=10).status_code == 200
    # Passed through the environment, as Flower reads it: never on a command line in `ps`.
    assert password not in " ".join(_command_lines())


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return lines


# --- no secrets in logs -------------------------------------------------------------------


@pytest.fixture
def trip_wire() -> Iterator[str]:
    """Registering this username makes PostgreSQL refuse the INSERT: a real database error."""
    username = "trip-the-database"
    with script_session() as session, session.begin():
        session.execute(
            text(
                """
                CREATE OR REPLACE FUNCTION test_trip_wire() RETURNS trigger AS $$
                BEGIN
                  IF NEW.username = 'trip-the-database' THEN
                    RAISE EXCEPTION 'refused by the test trip wire';
                  END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql
                """
            )
        )
        session.execute(
            text(
                "CREATE OR REPLACE TRIGGER test_trip_wire BEFORE INSERT ON users "
                "FOR EACH ROW EXECUTE FUNCTION test_trip_wire()"
            )
        )
    try:
        yield username
    finally:
        with script_session() as session, session.begin():
            session.execute(text("DROP TRIGGER IF EXISTS test_trip_wire ON users"))
            session.execute(text("DROP FUNCTION IF EXISTS test_trip_wire()"))


def _log_lines(records: list[logging.LogRecord]) -> str:
    formatter = json_formatter()
    return "\n".join(formatter.format(record) for record in records)


def test_logs_never_hold_passwords_or_authorization_headers(
    api: Api, caplog, trip_wire: str
) -> None:
    caplog.set_level(logging.DEBUG)
    client = api.client
    secrets_sent: list[str] = []

    def password(tag: str) -> str:
        value = f"{tag}-Pa55word-{len(secrets_sent)}-{os.urandom(4).hex()}"
        secrets_sent.append(value)
        return value

    def credentials(username: str, secret: str) -> dict[str, str]:
        headers = basic_auth(username, secret)
        secrets_sent.append(headers["Authorization"].split(" ", 1)[1])
        return headers

    # Registrations in the three encodings, and one the database refuses (logged with its
    # traceback: the statement may be there, its values may not).
    for encoding in ("form", "json", "multipart"):
        body = {"username": f"logged_{encoding}_{os.urandom(3).hex()}", "password": password("reg")}
        if encoding == "json":
            assert client.post("/users", json=body).status_code == 201
        else:
            content_type = "multipart/form-data" if encoding == "multipart" else None
            assert client.post("/users", data=body, content_type=content_type).status_code == 201
    member = api.register()
    secrets_sent.append(member.password)
    refused = client.post("/users", data={"username": trip_wire, "password": password("trip")})
    assert refused.status_code == 500

    path = f"/users/{member.id}/accounts"
    assert (
        client.get(path, headers=credentials(member.username, member.password)).status_code == 200
    )
    wrong = credentials(member.username, password("wrong"))
    for _ in range(12):  # into the throttle, which logs too
        assert client.get(path, headers=wrong).status_code in (401, 429)
    assert (
        client.get(path, headers=credentials("nobody-at-all", password("ghost"))).status_code == 401
    )
    superuser = credentials(SUPERUSER.username, SUPERUSER.password)
    deposit = client.post(
        f"/accounts/{member.accounts['USD']}/deposits", data={"amount": "1"}, headers=superuser
    )
    assert deposit.status_code == 202

    logged = _log_lines(caplog.records)
    assert "remit.access" in logged, "the request log was not captured"
    assert "refused by the test trip wire" in logged, "the database error was not logged"
    for secret in [*secrets_sent, SUPERUSER.password]:
        assert secret not in logged
    assert "Authorization" not in logged
    assert "Basic " not in logged
    assert "$argon2" not in logged  # the hashes are secrets too


# --- no stack traces in any response ------------------------------------------------------


def test_a_database_error_is_a_bare_problem(client, trip_wire: str) -> None:
    response = client.post("/users", json={"username": trip_wire, "password": "long enough"})
    body = assert_problem(response, 500, "internal_error")
    assert set(body) == {"type", "title", "status", "detail", "code"}
    assert body["detail"] == "an unexpected error occurred"
    raw = response.get_data(as_text=True)
    for leak in ("Traceback", 'File "', "psycopg", "sqlalchemy", "INSERT", "trip wire", "users"):
        assert leak not in raw
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# --- no version banners -------------------------------------------------------------------


@pytest.fixture
def gunicorn_server(app) -> Iterator[str]:
    """The API under its real server, as ./run.sh web starts it (one process, loopback)."""
    port = free_port()
    env = environment(PORT=str(port), PROMETHEUS_MULTIPROC_DIR=None)
    with serving(gunicorn_command(port, workers=1), env, port, "/currencies") as url:
        yield url


def test_no_server_announces_its_version(gunicorn_server: str) -> None:
    versions = {
        gunicorn.__version__,
        metadata.version("werkzeug"),
        metadata.version("flask"),
        sys.version.split()[0],
    }
    responses = [
        requests.get(gunicorn_server + path, headers=headers, timeout=10)
        for path, headers in [
            ("/currencies", {}),
            ("/nope", {}),
            ("/users/1/accounts", {}),
            ("/users/1/accounts", SUPERUSER.auth),
            ("/users/1/accounts", {"Authorization": "Basic !!!"}),
        ]
    ]
    assert [r.status_code for r in responses] == [200, 404, 401, 200, 401]
    for response in responses:
        # gunicorn names itself, without a version (kept: removing it takes a monkeypatch).
        assert response.headers["Server"] == "gunicorn"
        assert "X-Powered-By" not in response.headers
        shown = " ".join(f"{k}: {v}" for k, v in response.headers.items()) + response.text
        for version in versions:
            assert version not in shown
        assert response.headers["X-Content-Type-Options"] == "nosniff"


# --- the password hash and its cost -------------------------------------------------------


def test_production_hashes_are_argon2id_at_the_documented_cost() -> None:
    # The test suite lowers the cost through the environment; a process without those
    # variables hashes as production does.
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "from common.passwords import hash_password; print(hash_password('x'))",
        ],
        cwd=ROOT,
        env=environment(ARGON2_TIME_COST=None, ARGON2_MEMORY_KIB=None),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    parameters = extract_parameters(made.stdout.strip())
    assert parameters.type is Type.ID
    assert (parameters.time_cost, parameters.memory_cost, parameters.parallelism) == (1, 47104, 1)
    assert parameters.salt_len >= 16


def test_basic_tokens_in_this_file_are_really_base64() -> None:
    # Guards the log test above: it looks for the token as sent on the wire.
    token = basic_auth("u", "p")["Authorization"].split(" ", 1)[1]
    assert base64.b64decode(token) == b"u:p"
