"""HTTP Basic authentication and the path rules of API.md.

- every route marked auth needs valid credentials, or 401 with a challenge;
- /users/{id}/... belongs to that user; anyone else gets 403, except that the
  superuser may read (GET) every user's paths;
- the superuser moves money only by deposits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import g, request

from common.db import request_session, request_statements
from common.models import SUPERUSER_ID
from common.users import Principal, authenticate, recent_login, user_exists
from web import throttle
from web.problems import ApiError

P = ParamSpec("P")
R = TypeVar("R")

CHALLENGE = {"WWW-Authenticate": 'Basic realm="remit"'}


def _unauthorized(detail: str) -> ApiError:
    return ApiError("unauthorized", detail, CHALLENGE)


def _check_credentials() -> Principal:
    try:
        credentials = request.authorization
    except (ValueError, UnicodeError):
        credentials = None
    if credentials is None or credentials.type != "basic":
        raise _unauthorized("send HTTP Basic credentials")
    username = credentials.username or ""
    password = credentials.password or ""
    address = request.remote_addr or "unknown"
    wait = throttle.retry_after(username, address)
    if wait is not None:
        raise ApiError(
            "too_many_requests",
            "too many failed logins; try again later",
            {"Retry-After": str(wait)},
        )
    user = recent_login(username, password)
    if user is None:
        user = request_statements(lambda db: authenticate(db, username, password))
    if user is None:
        throttle.record_failure(username, address)
        raise _unauthorized("wrong username or password")
    return user


def authenticated(view: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.user = _check_credentials()
        return view(*args, **kwargs)

    return wrapper


def password_auth(view: Callable[P, R]) -> Callable[P, R]:
    """Routes that manage API keys and webhooks: HTTP Basic only, never a key."""
    return authenticated(view)


def current_user() -> Principal:
    user: Principal = g.user
    return user


def is_superuser() -> bool:
    return current_user().id == SUPERUSER_ID


def authorize_path_user(user_id: int, *, write: bool) -> None:
    """Enforce who may use /users/{user_id}/... for reading or for writing."""
    user = current_user()
    if user.id == SUPERUSER_ID:
        if write:
            raise ApiError("forbidden", "the superuser moves money only by deposits")
        if user_id != SUPERUSER_ID:
            with request_session() as session:
                if not user_exists(session, user_id):
                    raise ApiError("user_not_found", f"no user {user_id}")
        return
    if user.id != user_id:
        raise ApiError("forbidden", "this path belongs to another user")


def require_superuser() -> None:
    if not is_superuser():
        raise ApiError("forbidden", "only the superuser may do that")
