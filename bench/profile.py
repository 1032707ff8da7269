"""py-spy profiles of the stack's processes during a phase (`--profile`), summarised.

py-spy samples the process and its children (--subprocesses) 100 times a second
without stopping them (--nonblocking), and keeps only the thread holding the GIL
(--gil): in a gthread worker or a Celery process that is where Python spends CPU.
A thread waiting for PostgreSQL or Redis has released the GIL and does not appear;
PostgreSQL's own work is in the phase's CPU split instead. The raw collapsed stacks
are kept for flame graphs (e.g. `flamegraph.pl` or speedscope.app).
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

from bench.config import tool_path

# Which part of the stack a frame's file belongs to (first match wins).
CATEGORIES = (
    ("project", ("common/", "web/", "worker/")),
    ("psycopg", ("psycopg",)),
    ("sqlalchemy", ("sqlalchemy",)),
    ("celery/kombu", ("celery/", "kombu/", "billiard/", "vine/")),
    ("redis-py", ("redis/",)),
    ("flask/werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn", ("gunicorn/",)),
    ("pydantic", ("pydantic",)),
    ("argon2", ("argon2",)),
    ("logging/json", ("logging/", "pythonjsonlogger", "json/")),
)


class Recording:
    def __init__(self, name: str, pid: int, output: Path) -> None:
        py_spy = tool_path("py-spy")
        if py_spy is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.name = name
        self.output = output
        self.log = output.with_suffix(".log")
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--nonblocking",
                "--gil",
                "--nolineno",
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(output),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> dict[str, object]:
        """Stop sampling (py-spy writes its file on SIGINT) and summarise."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        if not self.output.exists():
            return {"error": f"py-spy wrote no profile, see {self.log}"}
        summary = summarize(self.output)
        summary["raw"] = str(self.output)
        return summary


def _frame_file(frame: str) -> str:
    # "function (path/to/file.py)" with --nolineno
    start = frame.rfind("(")
    return frame[start + 1 : -1] if start >= 0 else ""


def _category(frame: str) -> str:
    path = _frame_file(frame)
    for name, markers in CATEGORIES:
        if any(marker in path for marker in markers):
            return name
    return "other"


def _short(frame: str) -> str:
    name, _, rest = frame.partition(" (")
    path = rest.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarize(raw: Path, top: int = 15) -> dict[str, object]:
    """Self time by function and by category, inclusive time of the project's own
    functions, as shares of all samples."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy puts "process ..." and "thread ..." pseudo-frames at the root.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_time[_short(leaf)] += count
        categories[_category(leaf)] += count
        for frame in set(frames):
            if _category(frame) == "project":
                inclusive[_short(frame)] += count

    def shares(counter: Counter[str]) -> list[list[object]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "self_by_category_pct": dict(shares(Counter(categories))),
        "self_top_pct": shares(self_time),
        "project_inclusive_top_pct": shares(inclusive),
    }
