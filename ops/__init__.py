"""Remit's processes, run once in Python: each service's command line (ops.services),
throwaway PostgreSQL and Redis servers (ops.servers), a supervised process and the stack
of `up` (ops.supervisor), and the commands of ./run.sh (ops.__main__).

`./run.sh` only prepares .venv and hands over to `python -m ops COMMAND`; the benchmark
and the chaos suite start their servers and processes through the same modules.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
# Everything made at run time (git-ignored): the throwaway servers' data, beat's schedule.
RUN = ROOT / ".run"


def say(message: str) -> None:
    # A closed output (`./run.sh | tee log`, tee gone on Ctrl-C) must not stop a cleanup.
    with contextlib.suppress(OSError):
        print(f"remit: {message}", file=sys.stderr, flush=True)


def die(message: str, status: int = 1) -> NoReturn:
    say(message)
    raise SystemExit(status)
