"""Progress bars (tqdm, on stderr) and one-line messages."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

BAR_FORMAT = (
    "  {desc:<34} {percentage:3.0f}%|{bar:30}| {n_fmt}/{total_fmt} {unit} "
    "[{elapsed}<{remaining}{postfix}]"
)


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def bar(description: str, total: float, unit: str = "") -> Iterator[tqdm]:
    with tqdm(
        total=total,
        desc=description,
        unit=unit,
        bar_format=BAR_FORMAT,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=False,
        ncols=110,
        leave=True,
        # Bars only on a terminal; a log (CI, `| tee`) gets the phase lines alone.
        disable=not sys.stderr.isatty(),
    ) as progress:
        yield progress


@contextmanager
def timed(description: str, seconds: float) -> Iterator[Callable[[float], None]]:
    """A bar for a run of known length; call the yielded function with the elapsed time."""
    total = round(seconds, 1)
    with bar(description, total, "s") as progress:

        def tick(elapsed: float) -> None:
            progress.n = round(min(elapsed, total), 1)
            progress.refresh()

        yield tick
        progress.n = total
        progress.refresh()


def wait_until(
    description: str,
    remaining: Callable[[], int],
    timeout: float,
    poll: float = 0.1,
    on_sample: Callable[[float, int], None] | None = None,
) -> tuple[bool, float]:
    """Poll `remaining()` until it reaches 0, with a bar of the work done meanwhile.
    Returns (finished, seconds)."""
    started = time.perf_counter()
    first = remaining()
    if on_sample is not None:
        on_sample(0.0, first)
    if first == 0:
        return True, 0.0
    with bar(description, first, "") as progress:
        left = first
        while left > 0:
            if time.perf_counter() - started > timeout:
                return False, time.perf_counter() - started
            time.sleep(poll)
            left = remaining()
            elapsed = time.perf_counter() - started
            if on_sample is not None:
                on_sample(elapsed, left)
            progress.total = max(progress.total, left)
            progress.n = progress.total - left
            progress.refresh()
    return True, time.perf_counter() - started
