"""Remit's benchmark: `./run.sh bench [--quick]` (the method is in bench/README.md)."""

import sys


def say(message: str) -> None:
    """The bench's one kind of output besides the table: a line on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
