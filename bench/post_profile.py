"""In-process cost of one POST /users/{id}/transfers, with cProfile.

    .venv/bin/python -m bench.post_profile [N]

Runs the real app (Flask test client, no HTTP server) against a scratch database on
the local PostgreSQL (created, migrated and dropped here) and Redis DB 14. Prints the
wall time per POST and per GET /currencies (the trivial route) measured in the same
run, then the top of the profile. Single-threaded, so it shows where a request's own
time goes, without the noise of a loaded machine; the benchmark measures throughput.
"""

from __future__ import annotations

import base64
import cProfile
import logging
import os
import pstats
import secrets
import sys
import time

DATABASE = f"remit_post_profile_{secrets.token_hex(3)}"
os.environ.update(
    {
        "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}",
        "REDIS_URL": "redis://127.0.0.1:6379/14",
        "SUPERUSER_PASSWORD": "post-profile-superuser",
        "REMIT_LOG_SETUP": "0",
    }
)
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def main(count: int) -> None:
    from sqlalchemy import create_engine, text

    from common.db import dispose_engine
    from common.migrate import migrate
    from web.app import create_app

    migrate()
    logging.getLogger().handlers = [logging.NullHandler()]
    logging.getLogger().setLevel(logging.INFO)  # as in production: the log lines are paid
    client = create_app().test_client()
    password = secrets.token_hex(8)
    users = []
    for suffix in ("a", "b"):
        name = f"profile{suffix}{secrets.token_hex(3)}"
        user_id = client.post("/users", data={"username": name, "password": password}).json["id"]
        accounts = client.get(f"/users/{user_id}/accounts", headers=_auth(name, password)).json
        users.append((user_id, name, {a["currency"]: a["id"] for a in accounts}))
    (payer, name, source), (_, _, target) = users
    headers = _auth(name, password)
    body = {"from": source["USD"], "to": target["USD"], "amount": "1.00"}
    for _ in range(50):  # warm the pools, the caches and the compiled statements
        client.post(f"/users/{payer}/transfers", data=body, headers=headers)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for _ in range(count):
        client.post(f"/users/{payer}/transfers", data=body, headers=headers)
    profile.disable()
    post_ms = (time.perf_counter() - started) / count * 1000
    started = time.perf_counter()
    for _ in range(count):
        client.get("/currencies")
    trivial_ms = (time.perf_counter() - started) / count * 1000
    print(f"POST transfer {post_ms:.2f} ms, GET /currencies {trivial_ms:.2f} ms per request")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    dispose_engine()
    admin = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{DATABASE}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
