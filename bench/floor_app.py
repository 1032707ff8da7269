"""The least a Flask route can do for each request kind of phase c (bench/floor.py).

No auth, validation, logging or metrics: what is left is gunicorn, Flask and, for the
last two routes, one PostgreSQL round trip on a connection of the thread's own.
"""

from __future__ import annotations

import json
import os
import threading

import psycopg
from flask import Flask, Response, request

app = Flask(__name__)
_local = threading.local()


def _connection() -> psycopg.Connection[tuple[object, ...]]:
    connection = getattr(_local, "connection", None)
    if connection is None:
        connection = _local.connection = psycopg.connect(
            os.environ["FLOOR_DATABASE_URL"], autocommit=True
        )
    return connection


def _json(body: object, status: int) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@app.get("/trivial")
def trivial() -> Response:
    return _json([{"code": "USD", "decimals": 2}], 200)


@app.post("/form")
def form() -> Response:
    """Reads the form: a POST with no round trip."""
    return _json({"from": int(request.form["from"])}, 202)


@app.post("/select")
def select() -> Response:
    """One round trip that writes nothing."""
    row = _connection().execute("SELECT %s::bigint", (int(request.form["from"]),)).fetchone()
    return _json({"id": row[0] if row else None}, 202)


@app.post("/insert")
def insert() -> Response:
    """One durable INSERT ... RETURNING: the least that accepting a payment takes."""
    form = request.form
    row = (
        _connection()
        .execute(
            "INSERT INTO floor_transfers (from_account, to_account, amount, comment) "
            "VALUES (%s, %s, %s, %s) RETURNING id, created_at",
            (int(form["from"]), int(form["to"]), int(form["amount"]), form.get("comment", "")),
        )
        .fetchone()
    )
    assert row is not None
    return _json({"id": row[0], "created_at": row[1].isoformat()}, 202)
