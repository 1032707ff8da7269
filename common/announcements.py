"""Signed settlement announcements: once a batch committed, the worker publishes how
each of its transfers ended (status, reason, settled_at), and the web processes wake
the requests waiting on them (web.long_poll), which answer from the message.

An announcement naming only ids (a transfer marked failed), or one whose signature
does not verify, makes them read the transfer again. A lost announcement only makes a
waiter sleep until its timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from common.pubsub import publish, text_of
from common.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL = "remit:transfers:final"


@dataclass(frozen=True)
class Final:
    """A transfer's final state as its settlement committed it."""

    status: str
    reason: str | None
    settled_at: datetime | None


def announce_final(transfer_ids: Iterable[int]) -> None:
    """Tell waiting requests these transfers are final (after commit): they read them
    again. If the message is lost, they wake at their timeout."""
    ids = ",".join(str(i) for i in transfer_ids)
    if ids:
        publish(CHANNEL, ids)


def _signature(payload: str) -> str:
    return hmac.new(get_settings().secret_key, payload.encode(), hashlib.sha256).hexdigest()


_SIGNATURE_LENGTH = 64


def announce_decided(decided: Iterable[tuple[int, str, str | None]], settled_at: datetime) -> None:
    """Tell waiting requests how these transfers ended (after commit): (id, status,
    reason), settled ones at `settled_at`. The waiters answer from the message, without
    reading the transfer again (see docs/decisions/).

    Signed with SECRET_KEY: a client is told "settled" only on the word of a process
    that holds the key, never on a message anyone with access to Redis could publish.
    An announcement that does not verify (a forgery, or processes without a shared
    SECRET_KEY, as in development) only wakes the waiters, who read the transfer."""
    final = [[transfer_id, status, reason] for transfer_id, status, reason in decided]
    if final:
        payload = json.dumps({"settled_at": settled_at.isoformat(), "final": final})
        publish(CHANNEL, _signature(payload) + payload)


def parse_announcement(data: bytes) -> dict[int, Final | None]:
    """Transfer id -> its final state, or None where the message only names the id (or
    its signature does not verify)."""
    text = text_of(data)
    if text[_SIGNATURE_LENGTH : _SIGNATURE_LENGTH + 1] != "{":
        return {int(part): None for part in text.split(",") if part.isdigit()}
    signature, payload = text[:_SIGNATURE_LENGTH], text[_SIGNATURE_LENGTH:]
    try:
        message = json.loads(payload)
        entries = [
            (int(transfer_id), status, reason) for transfer_id, status, reason in message["final"]
        ]
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable settlement announcement ignored")
        return {}
    if not hmac.compare_digest(signature, _signature(payload)):
        return {transfer_id: None for transfer_id, _, _ in entries}
    settled_at = datetime.fromisoformat(message["settled_at"])
    return {
        transfer_id: Final(status, reason, settled_at if status == "settled" else None)
        for transfer_id, status, reason in entries
    }


HOLDS_CHANNEL = "remit:holds:changed"


def announce_holds(hold_ids: Iterable[int]) -> None:
    """Tell requests waiting on these holds that settlement changed them (after
    commit): they read them again. If the message is lost, they wake at their timeout."""
    ids = ",".join(str(i) for i in hold_ids)
    if ids:
        publish(HOLDS_CHANNEL, ids)
