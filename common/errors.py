"""Domain errors: a stable machine-readable code (docs/api.md) and a sentence for humans.

The web layer maps each code to its HTTP status; nothing here knows about HTTP.
"""

from __future__ import annotations


class RemitError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class NotFound(RemitError):
    pass


class Conflict(RemitError):
    pass


class Invalid(RemitError):
    pass
