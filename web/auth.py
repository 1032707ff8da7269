"""Authentication (HTTP Basic or an API key) and the path rules of API.md.

- every route marked auth needs valid credentials, or 401 with a challenge offering
  both schemes;
- a key may do what its scopes allow, decided by the HTTP method alone, so that a new
  route is covered without anyone thinking of it: GET (and HEAD) needs `read`, every
  other method `transfers`. Routes that manage keys and webhooks take `password_auth`
  instead: Basic only, a key gets 403 forbidden;
- /users/{id}/... belongs to that user; anyone else gets 403, except that the
  superuser may read (GET) every user's paths;
- the superuser moves money only by deposits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from flask import g, request

from common import api_keys
from common.db import request_session, request_statements
from common.models import SUPERUSER_ID, ApiKeyScope
from common.users import Principal, authenticate, recent_login, user_exists
from web import throttle
from web.access_log import log_on_access
from web.problems import ApiError

P = ParamSpec("P")
R = TypeVar("R")

CHALLENGE = {"WWW-Authenticate": 'Basic realm="remit", Bearer realm="remit"'}
# Set on every view function that authenticates: tests walk the URL map with it.
AUTH_MARK = "remit_auth"
READ_METHODS = frozenset({"GET", "HEAD"})


def _unauthorized(detail: str) -> ApiError:
    return ApiError("unauthorized", detail, CHALLENGE)


def _throttled(username: str | None, address: str) -> None:
    wait = throttle.retry_after(username, address)
    if wait is not None:
        raise ApiError(
            "too_many_requests",
            "too many failed logins; try again later",
            {"Retry-After": str(wait)},
        )


def _check_basic() -> Principal:
    try:
        credentials = request.authorization
    except (ValueError, UnicodeError):
        credentials = None
    if credentials is None or credentials.type != "basic":
        raise _unauthorized("send HTTP Basic credentials or an API key")
    username = credentials.username or ""
    password = credentials.password or ""
    address = request.remote_addr or "unknown"
    _throttled(username, address)
    user = recent_login(username, password)
    if user is None:
        user = request_statements(lambda db: authenticate(db, username, password))
    if user is None:
        throttle.record_failure(username, address)
        raise _unauthorized("wrong username or password")
    return user


def _bearer_token() -> str | None:
    """The token of an `Authorization: Bearer` header, or None for any other header."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _check_key(token: str) -> api_keys.KeyPrincipal:
    # Failures count per address only: a bearer names no username.
    address = request.remote_addr or "unknown"
    _throttled(None, address)
    key = None
    if api_keys.is_well_formed(token):  # else no query at all
        key = api_keys.recent_key(token) or request_statements(
            lambda db: api_keys.find_key(db, token)
        )
    if key is None:
        throttle.record_failure(None, address)
        raise _unauthorized("unknown, revoked or malformed API key")
    return key


def _required_scope() -> str:
    scope = ApiKeyScope.READ if request.method in READ_METHODS else ApiKeyScope.TRANSFERS
    return scope.value


def _authenticate(*, password_only: bool) -> None:
    token = _bearer_token()
    if token is None:
        g.user, g.api_key = _check_basic(), None
        return
    key = _check_key(token)
    g.user, g.api_key = key.user, key
    # Which key did it: the access line names it (never its secret).
    log_on_access(api_key_id=key.key_id)
    if password_only:
        raise ApiError("forbidden", "an API key cannot do this; use the password")
    scope = _required_scope()
    if scope not in key.scopes:
        raise ApiError("insufficient_scope", f"this API key lacks the scope {scope!r}")


def _marked(view: Callable[P, R], kind: str, password_only: bool) -> Callable[P, R]:
    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _authenticate(password_only=password_only)
        return view(*args, **kwargs)

    marked: Any = wrapper
    setattr(marked, AUTH_MARK, kind)
    return wrapper


def authenticated(view: Callable[P, R]) -> Callable[P, R]:
    """Basic or an API key whose scopes allow the request's method."""
    return _marked(view, "auth", password_only=False)


def password_auth(view: Callable[P, R]) -> Callable[P, R]:
    """Routes that manage API keys and webhooks: HTTP Basic only, never a key."""
    return _marked(view, "password", password_only=True)


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


def authorize_own_path(user_id: int) -> None:
    """/users/{user_id}/... changed by that user only (the superuser too, for itself):
    keys and webhooks, which move no money."""
    if current_user().id != user_id:
        raise ApiError("forbidden", "this path belongs to another user")


def require_superuser() -> None:
    if not is_superuser():
        raise ApiError("forbidden", "only the superuser may do that")
