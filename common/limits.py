"""Limits and shape rules, each defined once.

The request schemas (web.fields), the OpenAPI document, the URL converter, the ledger,
the settings check and the operator CLI all read them from here.
"""

from __future__ import annotations

import re

# PostgreSQL BIGINT: every id, balance and amount in minor units must fit in it.
BIGINT_MAX = 2**63 - 1

USERNAME_MAX_LENGTH = 64
USERNAME_PATTERN = r"^[A-Za-z0-9_@.+\-]+$"
PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 1024
PASSWORD_RULE = f"{PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters"
FULL_NAME_MAX_LENGTH = 200
COMMENT_MAX_LENGTH = 255
WEBHOOK_URL_MAX_LENGTH = 2048

# Idempotency-Key, as a header or as a batch item's field: 1 to 255 printable ASCII
# characters (the column is VARCHAR(255)).
IDEMPOTENCY_KEY_MAX_LENGTH = 255
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]+$"
IDEMPOTENCY_KEY_RULE = f"1-{IDEMPOTENCY_KEY_MAX_LENGTH} printable ASCII characters"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def is_password_length(password: str) -> bool:
    return PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH


def is_idempotency_key(key: str) -> bool:
    return len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH and _IDEMPOTENCY_KEY.fullmatch(key) is not None
