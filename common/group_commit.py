"""Group commit: concurrent single-row INSERTs of one process share one statement.

Each accepted payment used to be its own INSERT, hence its own commit and its own WAL
flush; under load a POST spent much of its time waiting for that flush (the
benchmark's POST run accepted 25 to 45 % more with `synchronous_commit = off`). Here
the first request to arrive inserts its row at once, on its own connection; requests
that arrive while that statement runs queue up, and the next of them inserts every
queued row in one statement: one round trip, one commit, one flush for all of them.
With nothing to share, a request inserts alone exactly as before, so a quiet system
waits for nothing. (Flat combining: the work is done by whichever waiting request is
first, not by a thread of its own, so there is no hand-off to pay for.)

Rows come back to their requests by idempotency key, and by position for rows without
one (ids are drawn from the sequence in the arrays' order). A key that conflicts, with
an earlier transfer or with a row earlier in the same statement, gets no row, exactly
as with a single-row ON CONFLICT DO NOTHING. If a shared statement fails, whatever
the reason (a bad row, a broken connection, a deadlock), each of its requests inserts
its row alone on its own connection, as it would have without the group: one bad row
or one dead connection cannot refuse its neighbours.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

from common.db import execute_direct


class _Slot:
    __slots__ = ("alone", "error", "inserted", "lead", "ready", "row")

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.ready = threading.Event()
        # Set before `ready`: this request is to insert the queue (it was next in line).
        self.lead = False
        # The shared statement failed: insert alone, as without the group.
        self.alone = False
        self.inserted: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Each request's row inserted in a statement shared with concurrent requests.

    `one` inserts a row given as bind parameters; `many` inserts rows given as one
    array per column (named as the columns); both end in ON CONFLICT DO NOTHING on
    (`key_columns`) and RETURNING the rows. Only for autocommit connections: the
    statement commits, for every request in it, as soon as it ends.
    """

    def __init__(
        self,
        one: ClauseElement,
        many: ClauseElement,
        columns: Sequence[str],
        key_columns: tuple[str, str],
    ) -> None:
        self._one, self._many = one, many
        self._columns = tuple(columns)
        self._scope, self._key = key_columns
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False
        # For tests and operators: statements run, and rows inserted by them.
        self.statements = 0
        self.rows = 0

    def queued(self) -> int:
        """Requests waiting for a statement now."""
        with self._lock:
            return len(self._queue)

    def insert(self, connection: psycopg.Connection[Any], row: dict[str, Any]) -> Any:
        """The inserted row, or None when its key conflicted. Raises what the INSERT
        raised (a DBAPIError, as execute_direct does)."""
        slot = _Slot(row)
        with self._lock:
            self._queue.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.ready.wait()
        if slot.lead or lead:
            self._lead(connection)
        if slot.alone:
            return execute_direct(connection, self._one, row).fetchone()
        if slot.error is not None:
            raise slot.error
        return slot.inserted

    def _lead(self, connection: psycopg.Connection[Any]) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._run(connection, batch)
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            for slot in batch:
                slot.ready.set()
            if successor is not None:
                successor.ready.set()

    def _run(self, connection: psycopg.Connection[Any], batch: list[_Slot]) -> None:
        try:
            if len(batch) == 1:
                inserted = execute_direct(connection, self._one, batch[0].row).fetchall()
                batch[0].inserted = inserted[0] if inserted else None
            else:
                columns = {c: [slot.row[c] for slot in batch] for c in self._columns}
                inserted = execute_direct(connection, self._many, columns).fetchall()
                self._match(batch, inserted)
            self.statements += 1
            self.rows += len(inserted)
        except DBAPIError as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            # Whatever failed (one row's constraint, this connection, a deadlock), each
            # request does what it did before there was a group: its own INSERT, on its
            # own connection, with its own error if any.
            for slot in batch:
                slot.alone = True
        except BaseException as error:
            for slot in batch:
                slot.error = error
            raise

    def _match(self, batch: list[_Slot], inserted: list[Any]) -> None:
        keyed: dict[tuple[Any, Any], Any] = {}
        plain = []
        for row in inserted:
            key = getattr(row, self._key)
            if key is None:
                plain.append(row)
            else:
                keyed[(getattr(row, self._scope), key)] = row
        # Rows without a key never conflict: one each, ids in the arrays' order.
        plain.sort(key=lambda row: row.id)
        waiting = [slot for slot in batch if slot.row[self._key] is None]
        if len(plain) != len(waiting):
            raise RuntimeError(f"{len(waiting)} rows without a key, {len(plain)} came back")
        for slot, row in zip(waiting, plain, strict=True):
            slot.inserted = row
        for slot in batch:
            key = slot.row[self._key]
            if key is None:
                continue
            # Of two requests with one key in the statement, the first inserted it and
            # the second conflicted with it: the row goes to the one whose fields it has.
            row = keyed.get((slot.row[self._scope], key))
            if row is not None and all(getattr(row, c) == slot.row[c] for c in self._columns):
                slot.inserted = keyed.pop((slot.row[self._scope], key))
