"""Balance history at 1,000,000 postings (docs/decisions/0035-balance-history.md).

`.venv/bin/python -m bench.history.run [database url of the server]`: makes a scratch
database from the migrations, loads 1,000,000 postings (load.sql), prints the EXPLAIN
(ANALYZE, BUFFERS) of GET /accounts/{id}?at='s query (explain.sql, through psql), then
what the index costs an insert of postings: batches of 3,000 (1,000 transfers x 3 legs,
settlement's batch), each its own transaction, with and without the index, alternated;
WAL bytes and milliseconds per batch. Drops the database at the end.
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from alembic import command
from sqlalchemy.engine import make_url

from common.migrate import alembic_config

HERE = Path(__file__).parent
SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
BATCH = 1000  # transfers; 3 postings each
ROUNDS = 4  # alternations of with / without
BATCHES = 10  # per variant per round
INDEX = "ix_postings_account_id_created_at_id"

_INSERT_TRANSFERS = (
    "INSERT INTO transfers (id, status, from_account_id, to_account_id, from_user_id,"
    " to_user_id, currency, amount, commission, requested_by, settled_at, attempts)"
    " SELECT %s + g, 'settled', f.id, t.id, f.user_id, t.user_id, 'USD', 100, 1,"
    " f.user_id, now(), 1 FROM generate_series(0, %s - 1) g"
    " JOIN accounts f ON f.id = (SELECT min(id) FROM accounts"
    " WHERE currency = 'USD' AND kind = 'user') + g %% 900"
    " JOIN accounts t ON t.id = f.id + 1"
)
# Settlement's shape: three legs per transfer, stamped with the statement's time.
_INSERT_POSTINGS = (
    "INSERT INTO postings (transfer_id, account_id, leg, amount, balance_after, created_at)"
    " SELECT t.id, CASE l.leg WHEN 'debit' THEN t.from_account_id"
    " WHEN 'credit' THEN t.to_account_id ELSE 3 END, l.leg,"
    " CASE l.leg WHEN 'debit' THEN -101 WHEN 'credit' THEN 100 ELSE 1 END, 0,"
    " statement_timestamp()"
    " FROM unnest(%s::bigint[]) AS u(id) JOIN transfers t ON t.id = u.id"
    " CROSS JOIN (VALUES ('debit'), ('credit'), ('commission')) AS l(leg)"
)


def insert_cost(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT max(id) + 1 FROM transfers").fetchone()
        assert row is not None
        next_id = int(row[0])
        db.execute(_INSERT_TRANSFERS, (next_id, ROUNDS * 2 * BATCHES * BATCH))
        db.execute("VACUUM ANALYZE transfers")
        results: dict[str, list[tuple[int, float]]] = {"with": [], "without": []}
        for _ in range(ROUNDS):
            for variant in ("with", "without"):
                if variant == "without":
                    db.execute(f"DROP INDEX {INDEX}")
                db.execute("CHECKPOINT")  # each run starts after one: full-page writes alike
                for _ in range(BATCHES):
                    ids = list(range(next_id, next_id + BATCH))
                    next_id += BATCH
                    start = db.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                    started = time.perf_counter()
                    with db.transaction():
                        db.execute(_INSERT_POSTINGS, (ids,))
                    elapsed = (time.perf_counter() - started) * 1000
                    wal = db.execute(
                        "SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (start and start[0],)
                    ).fetchone()
                    results[variant].append((int(wal[0]) if wal else 0, elapsed))
                if variant == "without":
                    db.execute(f"CREATE INDEX {INDEX} ON postings (account_id, created_at, id)")
        for variant, rows in results.items():
            wal_kib = statistics.median(w for w, _ in rows) / 1024
            ms = statistics.median(m for _, m in rows)
            print(
                f"{variant:>7} the index: median {wal_kib:,.0f} KiB of WAL, {ms:.1f} ms"
                f" per 3,000 postings ({len(rows)} batches)"
            )


def main() -> None:
    server = make_url(sys.argv[1] if len(sys.argv) > 1 else SERVER)
    name = f"remit_history_{secrets.token_hex(3)}"
    url = server.set(database=name).render_as_string(hide_password=False)
    admin = server.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    try:
        config = alembic_config(url)
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        for script in ("load.sql", "explain.sql"):
            psql = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(HERE / script)]
            subprocess.run(psql, check=True)
        insert_cost(url)
    finally:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"DROP DATABASE {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
