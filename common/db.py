"""The database engine and units of work shared by web, worker and scripts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from common.settings import get_settings


@cache
def get_engine() -> Engine:
    settings = get_settings()
    return create_engine(
        settings.database_url,
        pool_size=int(os.environ.get("DB_POOL_SIZE", "10")),
        max_overflow=int(os.environ.get("DB_MAX_OVERFLOW", "20")),
        # A dead connection (PostgreSQL restarted, backend terminated) is noticed on checkout
        # instead of failing the first statement of a request.
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={
            "connect_timeout": 5,
            "application_name": os.environ.get("REMIT_APP_NAME", "remit"),
        },
    )


@cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def new_session() -> Session:
    return _session_factory()()


@contextmanager
def transaction() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with new_session() as session, session.begin():
        yield session


def dispose_engine() -> None:
    """Drop pooled connections inherited across fork (gunicorn --preload, Celery prefork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
