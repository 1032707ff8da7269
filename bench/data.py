"""Bulk data written with SQL, as the API and the worker would have written it
(bench/README.md, "Data"); common.audit checks it all."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import psycopg


@dataclass
class BenchUser:
    id: int
    username: str
    accounts: dict[str, int] = field(default_factory=dict)


def create_users(
    conn: psycopg.Connection, count: int, password_hash: str, prefix: str = "bench_"
) -> list[BenchUser]:
    with conn.transaction():
        users = {
            user_id: BenchUser(user_id, username)
            for user_id, username in conn.execute(
                "INSERT INTO users (username, password_hash, full_name) "
                "SELECT %s || lpad(g::text, 6, '0'), %s, 'Bench User' "
                "FROM generate_series(0, %s - 1) AS g RETURNING id, username",
                (prefix, password_hash, count),
            )
        }
        # As registration does: one zero-balance account per currency.
        rows = conn.execute(
            "INSERT INTO accounts (user_id, currency, kind) "
            "SELECT u, c.code, 'user' FROM unnest(%s::bigint[]) AS u CROSS JOIN currencies c "
            "ORDER BY u, c.code RETURNING id, user_id, currency",
            (sorted(users),),
        ).fetchall()
    for account_id, user_id, currency in rows:
        users[user_id].accounts[currency] = account_id
    return list(users.values())


# Per table, a row as the API stores it: an API key (user id, prefix, digest) with both
# scopes, as POST .../api-keys; a webhook (user id, URL, secret) for every event type.
_ROWS = {
    "api_keys": "INSERT INTO api_keys (user_id, name, scopes, prefix, digest) "
    "VALUES (%s, 'bench', ARRAY['read', 'transfers'], %s, %s)",
    "webhooks": "INSERT INTO webhooks (user_id, url, events, secret) VALUES (%s, %s, '{*}', %s)",
}


def insert_rows(conn: psycopg.Connection, table: str, rows: list[tuple]) -> None:
    with conn.cursor() as cursor:
        cursor.executemany(_ROWS[table], rows)


# Cross-user draws of 1.00 to 99.99 (in the currency's minor units) between random
# bench users, the currencies in turn, commission at the currency's rate (ceil, as
# common.money.commission_for). setseed() makes a run's draws repeatable.
_DRAWS = """
WITH payers AS (
  SELECT id, user_id, currency,
         row_number() OVER (PARTITION BY currency ORDER BY user_id) - 1 AS n
  FROM accounts WHERE kind = 'user' AND user_id = ANY(%(users)s)
), draws AS (
  SELECT g, (%(codes)s::text[])[1 + g %% cardinality(%(codes)s::text[])] AS currency,
         floor(random() * cardinality(%(users)s))::int AS payer,
         floor(random() * (cardinality(%(users)s) - 1))::int AS payee, random() AS size
  FROM generate_series(0, %(count)s - 1) AS g
), priced AS (
  SELECT d.*, c.commission_rate, floor((1 + size * 99) * 10 ^ c.decimals)::bigint AS amount
  FROM draws d JOIN currencies c ON c.code = d.currency
), pairs AS (
  SELECT r.*, p.id AS from_id, q.id AS to_id, p.user_id AS from_user, q.user_id AS to_user
  FROM priced r
  JOIN payers p ON p.currency = r.currency AND p.n = r.payer
  JOIN payers q ON q.currency = r.currency AND q.n = r.payee + (r.payee >= r.payer)::int
)"""


def _drawn(statement: str) -> str:
    """A statement on the draws (constants only: nothing from outside goes into SQL)."""
    return _DRAWS + statement


_RANDOM = _drawn(""", inserted AS (
  INSERT INTO transfers (from_account_id, to_account_id, from_user_id, to_user_id, currency,
                         amount, commission, requested_by, status, attempts, created_at,
                         settled_at)
  SELECT from_id, to_id, from_user, to_user, currency, amount,
         ceil(amount * commission_rate)::bigint, from_user, %(status)s,
         %(attempts)s, coalesce(%(at)s::timestamptz + g * interval '1 microsecond', now()),
         %(at)s::timestamptz + g * interval '1 microsecond'
  FROM pairs ORDER BY g
  RETURNING id
)
SELECT min(id), max(id) FROM inserted
""")

# Pending holds as POST /users/{id}/holds records them (the settler reserves them).
_HOLDS = _drawn(""", inserted AS (
  INSERT INTO holds (from_account_id, to_account_id, from_user_id, to_user_id, currency,
                     amount, commission, requested_by, expires_at)
  SELECT from_id, to_id, from_user, to_user, currency, amount,
         ceil(amount * commission_rate)::bigint, from_user, now() + interval '1 day'
  FROM pairs ORDER BY g
  RETURNING id
)
SELECT min(id), max(id) FROM inserted
""")

# Phase i's mix, interleaved in creation order by g % 20: 0-13 transfers, 14 a capture
# of an even-numbered held hold (full or part of it), 15 the void of the next one (no
# row here), 16-17 refunds of settled transfers (full or part), 18-19 payouts. Holds
# and originals are found by id from the first of their (contiguous) loads: primary-key
# lookups whatever the planner thinks of tables loaded moments ago.
_MIX = _drawn(""", mix AS (
  SELECT r.g, CASE WHEN r.g %% 20 < 14 THEN 'transfer' ELSE 'payout' END AS kind, r.from_id,
         CASE WHEN r.g %% 20 < 14 THEN r.to_id ELSE c.external_account_id END AS to_id,
         r.from_user, CASE WHEN r.g %% 20 < 14 THEN r.to_user ELSE x.user_id END AS to_user,
         r.currency, r.amount, ceil(r.amount * r.commission_rate)::bigint AS commission,
         r.from_user AS requested_by, NULL::bigint AS refund_of, NULL::bigint AS hold_id,
         CASE WHEN r.g %% 20 >= 18 THEN 'bench payout ' || r.g END AS destination
  FROM pairs r JOIN currencies c ON c.code = r.currency
  JOIN accounts x ON x.id = c.external_account_id
  WHERE r.g %% 20 < 14 OR r.g %% 20 >= 18
  UNION ALL
  SELECT r.g, 'capture', h.from_account_id, h.to_account_id, h.from_user_id, h.to_user_id,
         h.currency, a.amount, ceil(a.amount * c.commission_rate)::bigint, h.from_user_id,
         NULL, h.id, NULL
  FROM draws r JOIN holds h ON h.id = %(holds_first)s + r.g / 20 * 2 AND h.status = 'held'
  JOIN currencies c ON c.code = h.currency
  CROSS JOIN LATERAL (SELECT CASE WHEN r.size < 0.5 THEN h.amount
                             ELSE greatest(1, floor(h.amount * r.size))::bigint END AS amount) a
  WHERE r.g %% 20 = 14
  UNION ALL
  SELECT r.g, 'refund', o.to_account_id, o.from_account_id, o.to_user_id, o.from_user_id,
         o.currency, a.amount, 0, o.to_user_id, o.id, NULL, NULL
  FROM draws r JOIN transfers o ON o.id = %(originals_first)s + r.g / 20 * 2 + r.g %% 20 - 16
  CROSS JOIN LATERAL (SELECT CASE WHEN r.size < 0.5 THEN o.amount
                             ELSE greatest(1, floor(o.amount * r.size))::bigint END AS amount) a
  WHERE r.g %% 20 IN (16, 17)
), inserted AS (
  INSERT INTO transfers (from_account_id, to_account_id, from_user_id, to_user_id, currency,
                         amount, commission, requested_by, kind, refund_of, hold_id,
                         destination)
  SELECT from_id, to_id, from_user, to_user, currency, amount, commission, requested_by,
         kind, refund_of, hold_id, destination
  FROM mix ORDER BY g
  RETURNING id
)
SELECT min(id), max(id) FROM inserted
""")
# What the web writes beside a capture and a refund (docs/decisions/0036): the hold's
# transfer_id, the original's refunds_claimed; and a void's request on the odd holds.
_MIX_INTENTS = (
    "UPDATE holds h SET transfer_id = t.id FROM transfers t"
    " WHERE t.id BETWEEN %(first)s AND %(last)s AND t.hold_id = h.id",
    "UPDATE transfers o SET refunds_claimed = o.refunds_claimed + t.amount FROM transfers t"
    " WHERE t.id BETWEEN %(first)s AND %(last)s AND t.refund_of = o.id",
    "UPDATE holds SET void_requested_at = now() WHERE status = 'held'"
    " AND id BETWEEN %(holds_first)s AND %(holds_first)s + %(count)s / 10 + 1"
    " AND (id - %(holds_first)s) %% 2 = 1 AND (id - %(holds_first)s) / 2 * 20 + 15 < %(count)s",
)

# One settled deposit from each currency's external account to every bench account.
_FUNDING = """
WITH inserted AS (
  INSERT INTO transfers (from_account_id, to_account_id, from_user_id, to_user_id, currency,
                         amount, commission, requested_by, status, attempts, settled_at)
  SELECT c.external_account_id, a.id, 1, a.user_id, c.code,
         %(major)s * (10::numeric ^ c.decimals)::bigint, 0, 1, 'settled', 1, clock_timestamp()
  FROM accounts a JOIN currencies c ON c.code = a.currency
  WHERE a.kind = 'user' AND a.user_id = ANY(%(users)s) AND a.currency = ANY(%(codes)s)
  ORDER BY a.id
  RETURNING id
)
SELECT min(id), max(id) FROM inserted
"""

# The postings of settled transfers as plan_batch writes them (debit, credit, commission
# if any; ids in that order), each with its account's running balance; then the balances.
_POSTINGS = """
WITH legs AS (
  SELECT t.id AS transfer_id, l.n, l.leg, l.account_id, l.amount, t.created_at
  FROM transfers t JOIN currencies c ON c.code = t.currency
  CROSS JOIN LATERAL (VALUES
    (1, 'debit', t.from_account_id, -(t.amount + t.commission)),
    (2, 'credit', t.to_account_id, t.amount),
    (3, 'commission', c.commission_account_id, t.commission)) AS l(n, leg, account_id, amount)
  WHERE t.id BETWEEN %(first)s AND %(last)s AND l.amount <> 0
)
INSERT INTO postings (transfer_id, account_id, leg, amount, balance_after, created_at)
SELECT l.transfer_id, l.account_id, l.leg, l.amount,
       a.balance + sum(l.amount) OVER (PARTITION BY l.account_id ORDER BY l.transfer_id, l.n),
       l.created_at
FROM legs l JOIN accounts a ON a.id = l.account_id
ORDER BY l.transfer_id, l.n
"""
_BALANCES = """
UPDATE accounts a SET balance = a.balance + s.delta
FROM (SELECT account_id, sum(amount) AS delta FROM postings
      WHERE transfer_id BETWEEN %(first)s AND %(last)s GROUP BY account_id) AS s
WHERE a.id = s.account_id
"""


def _insert(conn: psycopg.Connection, sql: str, params: dict, settle: bool) -> tuple[int, int]:
    """Run an INSERT of transfers; with `settle`, write their postings and balances too."""
    first, last = conn.execute(sql, params).fetchone()
    if settle:
        conn.execute(_POSTINGS, {"first": first, "last": last})
        # The no_overdraft CHECK refuses a user's negative final balance here.
        conn.execute(_BALANCES, {"first": first, "last": last})
    return int(first), int(last)


def fund(conn: psycopg.Connection, users: list[int], codes: tuple[str, ...], major: int) -> int:
    """One settled deposit of `major` units per user and currency; how many."""
    with conn.transaction():
        params = {"users": users, "codes": list(codes), "major": major}
        first, last = _insert(conn, _FUNDING, params, settle=True)
    return last - first + 1


def insert_random(
    conn: psycopg.Connection,
    users: list[int],
    codes: tuple[str, ...],
    count: int,
    *,
    seed: int,
    settled_from: datetime | None = None,
) -> tuple[int, int]:
    """`count` random transfers, their id range: pending (no doorbell rung), or settled
    one microsecond apart from `settled_from`."""
    settled = settled_from is not None
    with conn.transaction():
        conn.execute("SELECT setseed(%s)", ((seed % 1000) / 1000,))
        if settled:  # foreign-key triggers skipped, more sort memory
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("SET LOCAL work_mem = '256MB'")
        status = "settled" if settled else "pending"
        params = {"users": users, "codes": list(codes), "count": count, "at": settled_from,
                  "status": status, "attempts": int(settled)}  # fmt: skip
        return _insert(conn, _RANDOM, params, settle=settled)


def insert_holds(
    conn: psycopg.Connection, users: list[int], codes: tuple[str, ...], count: int, seed: int
) -> tuple[int, int]:
    """`count` random pending holds, their id range."""
    with conn.transaction():
        conn.execute("SELECT setseed(%s)", ((seed % 1000) / 1000,))
        params = {"users": users, "codes": list(codes), "count": count}
        return _insert(conn, _HOLDS, params, settle=False)


def insert_mix(
    conn: psycopg.Connection,
    users: list[int],
    codes: tuple[str, ...],
    count: int,
    *,
    seed: int,
    holds: tuple[int, int],
    originals: tuple[int, int],
) -> tuple[int, int]:
    """Phase i's `count` operations, pending (`holds`: held ones to capture or void,
    `originals`: settled transfers to refund); the id range of its transfer rows."""
    params = {"users": users, "codes": list(codes), "count": count,
              "holds_first": holds[0], "originals_first": originals[0]}  # fmt: skip
    with conn.transaction():
        conn.execute("SELECT setseed(%s)", ((seed % 1000) / 1000,))
        first, last = _insert(conn, _MIX, params, settle=False)
        for sql in _MIX_INTENTS:
            conn.execute(sql, params | {"first": first, "last": last})
    return first, last


def scalar(conn: psycopg.Connection, sql: str, params: tuple = ()) -> int:
    return int(conn.execute(sql, params).fetchone()[0] or 0)


def pending_count(conn: psycopg.Connection) -> int:
    return scalar(conn, "SELECT count(*) FROM transfers WHERE status = 'pending'")
