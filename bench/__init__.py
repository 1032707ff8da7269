"""Remit's benchmark: `./run.sh bench [--quick]` (the method is in bench/README.md)."""

import sys


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
