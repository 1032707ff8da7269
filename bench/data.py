"""Bulk data written with SQL (COPY) rather than through the API (bench/README.md, "Data"):
users and their accounts as registration opens them; funding and history as the worker
would have settled them (foreign-key triggers skipped, common.audit checks the whole
ledger afterwards); backlogs of pending transfers exactly as the API inserts them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from common.currencies import CurrencyInfo
from common.money import commission_for

CHUNK = 20_000
USERNAME_PREFIX = "bench_"


@dataclass
class BenchUser:
    id: int
    username: str
    accounts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    from_account: int
    to_account: int
    from_user: int
    to_user: int
    currency: str
    amount: int
    commission: int
    requested_by: int


@dataclass
class Loaded:
    """Id ranges of transfers written by SQL, which the worker did not settle."""

    ranges: list[tuple[int, int]] = field(default_factory=list)

    def sql_exclusion(self) -> str:
        parts = [f"id BETWEEN {int(a)} AND {int(b)}" for a, b in self.ranges]
        return f"NOT ({' OR '.join(parts)})" if parts else "TRUE"


Progress = Callable[[int], object]


def currencies(conn: psycopg.Connection) -> dict[str, CurrencyInfo]:
    rows = conn.execute(
        "SELECT code, name, decimals, commission_rate, commission_account_id, "
        "external_account_id FROM currencies ORDER BY code"
    ).fetchall()
    return {row[0]: CurrencyInfo(*row) for row in rows}


def create_users(conn: psycopg.Connection, count: int, password_hash: str) -> list[BenchUser]:
    with conn.transaction():
        with conn.cursor().copy("COPY users (username, password_hash, full_name) FROM STDIN") as cp:
            for number in range(count):
                cp.write_row((f"{USERNAME_PREFIX}{number:06d}", password_hash, "Bench User"))
        users = {
            user_id: BenchUser(user_id, username)
            for user_id, username in conn.execute(
                "SELECT id, username FROM users WHERE username LIKE %s ORDER BY id",
                (USERNAME_PREFIX + "%",),
            )
        }
        # As registration does: one zero-balance account per currency.
        rows = conn.execute(
            "INSERT INTO accounts (user_id, currency, kind) "
            "SELECT u.id, c.code, 'user' FROM users u CROSS JOIN currencies c "
            "WHERE u.username LIKE %s ORDER BY u.id, c.code RETURNING id, user_id, currency",
            (USERNAME_PREFIX + "%",),
        ).fetchall()
    for account_id, user_id, currency in rows:
        users[user_id].accounts[currency] = account_id
    return list(users.values())


def _reserve_transfer_ids(conn: psycopg.Connection, count: int) -> int:
    first = conn.execute("SELECT nextval('transfers_id_seq')").fetchone()[0]
    if count > 1:
        conn.execute("SELECT setval('transfers_id_seq', %s)", (first + count - 1,))
    return int(first)


TRANSFER_COLUMNS = (
    "id, status, from_account_id, to_account_id, from_user_id, to_user_id, currency, "
    "amount, commission, requested_by, attempts, created_at, settled_at"
)


def insert_settled(
    conn: psycopg.Connection,
    rows: Sequence[Row] | Iterator[Row],
    count: int,
    *,
    commission_accounts: dict[str, int],
    started: datetime,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Write `count` settled transfers with their postings and balances; returns the
    id range. Raises if a transfer would overdraw an account (the caller funds enough)."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        # Nobody else may insert transfers meanwhile: the ids are reserved as a block.
        conn.execute("LOCK TABLE transfers IN SHARE ROW EXCLUSIVE MODE")
        balances: dict[int, int] = {}
        kinds: dict[int, str] = {}
        for account_id, kind, balance in conn.execute(
            "SELECT id, kind, balance FROM accounts ORDER BY id FOR NO KEY UPDATE"
        ):
            balances[account_id] = balance
            kinds[account_id] = kind
        first = _reserve_transfer_ids(conn, count)
        next_id = first
        changed: set[int] = set()
        iterator = iter(rows)
        done = 0
        while done < count:
            chunk = [row for _, row in zip(range(min(CHUNK, count - done)), iterator, strict=False)]
            if not chunk:
                raise ValueError(f"insert_settled got {done} rows, {count} announced")
            transfers, postings = [], []
            for row in chunk:
                when = started + timedelta(microseconds=next_id - first)
                transfers.append(
                    (next_id, "settled", row.from_account, row.to_account, row.from_user,
                     row.to_user, row.currency, row.amount, row.commission, row.requested_by,
                     1, when, when)
                )  # fmt: skip
                legs = [
                    ("debit", row.from_account, -(row.amount + row.commission)),
                    ("credit", row.to_account, row.amount),
                ]
                if row.commission:
                    legs.append(("commission", commission_accounts[row.currency], row.commission))
                for leg, account_id, amount in legs:
                    balances[account_id] += amount
                    if balances[account_id] < 0 and kinds[account_id] != "external":
                        raise ValueError(f"bench data would overdraw account {account_id}")
                    changed.add(account_id)
                    postings.append((next_id, account_id, leg, amount, balances[account_id], when))
                next_id += 1
            with conn.cursor().copy(f"COPY transfers ({TRANSFER_COLUMNS}) FROM STDIN") as cp:
                for transfer in transfers:
                    cp.write_row(transfer)
            with conn.cursor().copy(
                "COPY postings (transfer_id, account_id, leg, amount, balance_after, created_at) "
                "FROM STDIN"
            ) as cp:
                for posting in postings:
                    cp.write_row(posting)
            done += len(chunk)
            if progress is not None:
                progress(len(chunk))
        ids = sorted(changed)
        conn.execute(
            "UPDATE accounts SET balance = v.balance FROM unnest(%s::bigint[], %s::bigint[]) "
            "AS v(id, balance) WHERE accounts.id = v.id",
            (ids, [balances[i] for i in ids]),
        )
    return first, next_id - 1


def funding_rows(
    users: Sequence[BenchUser], table: dict[str, CurrencyInfo], codes: Sequence[str], amount: int
) -> list[Row]:
    """A deposit from the external account into every user's account of each currency."""
    return [
        Row(table[code].external_account_id, user.accounts[code], 1, user.id, code,
            amount * 10 ** table[code].decimals, 0, 1)
        for user in users
        for code in codes
    ]  # fmt: skip


def random_rows(
    users: Sequence[BenchUser],
    table: dict[str, CurrencyInfo],
    codes: Sequence[str],
    count: int,
    rng: random.Random,
) -> Iterator[Row]:
    """Cross-user transfers of 1.00 to 99.99 between random users, commission on top."""
    for number in range(count):
        code = codes[number % len(codes)]
        currency = table[code]
        payer = rng.randrange(len(users))
        payee = rng.randrange(len(users) - 1)
        payee += payee >= payer
        unit = 10**currency.decimals
        amount = rng.randint(unit, 100 * unit - 1)
        yield Row(
            users[payer].accounts[code],
            users[payee].accounts[code],
            users[payer].id,
            users[payee].id,
            code,
            amount,
            commission_for(amount, currency.commission_rate),
            users[payer].id,
        )


def insert_pending(
    conn: psycopg.Connection,
    rows: Iterator[Row],
    count: int,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Pending transfers as the API inserts them (foreign keys checked); returns the id
    range. No doorbell is rung: the caller rings once the whole backlog is in."""
    with conn.transaction():
        conn.execute("LOCK TABLE transfers IN SHARE ROW EXCLUSIVE MODE")
        first = _reserve_transfer_ids(conn, count)
        with conn.cursor().copy(
            "COPY transfers (id, from_account_id, to_account_id, from_user_id, to_user_id, "
            "currency, amount, commission, requested_by) FROM STDIN"
        ) as cp:
            for number, row in zip(range(count), rows, strict=False):
                cp.write_row(
                    (first + number, row.from_account, row.to_account, row.from_user,
                     row.to_user, row.currency, row.amount, row.commission, row.requested_by)
                )  # fmt: skip
                if progress is not None and (number + 1) % CHUNK == 0:
                    progress(CHUNK)
    if progress is not None:
        progress(count % CHUNK)
    return first, first + count - 1


def scalar(conn: psycopg.Connection, sql: str, params: tuple = ()) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def decided_by_worker(conn: psycopg.Connection, loaded: Loaded) -> int:
    """Transfers the worker settled or rejected (not those written here as settled)."""
    # The exclusion holds only integers formatted by Loaded.
    sql = "SELECT count(*) FROM transfers WHERE status IN ('settled', 'rejected') AND "
    return scalar(conn, sql + loaded.sql_exclusion())


def pending_count(conn: psycopg.Connection) -> int:
    return scalar(conn, "SELECT count(*) FROM transfers WHERE status = 'pending'")


def now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0].astimezone(UTC)
