"""In-process cost of one POST /users/{id}/transfers, with cProfile.

    .venv/bin/python -m bench.post_profile [N]

Runs the real app (Flask test client, no HTTP server) against a scratch database on
the local PostgreSQL (created, migrated and dropped here) and Redis DB 14. Prints the
wall and CPU time per POST and per GET /currencies (the trivial route) measured in
the same run (unprofiled), then the top of the profile (PROFILE_SORT=tottime to
sort by own time, PROFILE_CLOCK=cpu to count CPU time instead of wall time,
PROFILE_LINES=N for more lines). Single-threaded, so it shows where a request's own
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
from collections.abc import Callable

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

    def per_request(send: Callable[[], object]) -> tuple[float, float]:
        """Wall and this process's CPU milliseconds per request (the CPU leaves out
        PostgreSQL's and Redis's own work and the waits for them)."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            send()
        return (
            (time.perf_counter() - wall) / count * 1000,
            (time.process_time() - cpu) / count * 1000,
        )

    # PROFILE_CLOCK=cpu attributes this process's CPU time rather than wall time, which
    # leaves out the waits for PostgreSQL and Redis (what a loaded server pays for).
    clock = time.process_time if os.environ.get("PROFILE_CLOCK") == "cpu" else time.perf_counter
    profile = cProfile.Profile(clock)
    profile.enable()
    post = per_request(lambda: client.post(f"/users/{payer}/transfers", data=body, headers=headers))
    profile.disable()
    post = per_request(lambda: client.post(f"/users/{payer}/transfers", data=body, headers=headers))
    trivial = per_request(lambda: client.get("/currencies"))
    print(
        f"POST transfer {post[0]:.2f} ms ({post[1]:.2f} ms CPU), GET /currencies "
        f"{trivial[0]:.2f} ms ({trivial[1]:.2f} ms CPU) per request; "
        f"CPU ratio trivial/POST {trivial[1] / post[1]:.2f}"
    )
    stats = pstats.Stats(profile).sort_stats(os.environ.get("PROFILE_SORT", "cumulative"))
    stats.print_stats(int(os.environ.get("PROFILE_LINES", "30")))
    dispose_engine()
    admin = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{DATABASE}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
