"""One-line messages and progress bars (tqdm, on stderr, only on a terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def bar(description: str, total: float, unit: str = "") -> tqdm:
    return tqdm(
        total=total,
        desc=f"  {description:<34}",
        unit=unit,
        bar_format="{desc} {percentage:3.0f}%|{bar:30}| {n_fmt}/{total_fmt} {unit} "
        "[{elapsed}<{remaining}]",
        file=sys.stderr,
        mininterval=0.5,
        ncols=110,
        # A log (CI, `| tee`) gets the phase lines alone.
        disable=not sys.stderr.isatty(),
    )


@contextmanager
def timed(description: str, seconds: float) -> Iterator[Callable[[float], None]]:
    """A bar for a run of known length; call the yielded function with the elapsed time."""
    total = round(seconds, 1)
    with bar(description, total, "s") as progress:

        def tick(elapsed: float) -> None:
            progress.n = round(min(elapsed, total), 1)
            progress.refresh()

        yield tick
        tick(total)


def wait_until(
    description: str,
    remaining: Callable[[], int],
    timeout: float,
    on_sample: Callable[[float, int], object] = lambda t, n: None,
) -> tuple[bool, float]:
    """Poll `remaining()` every 0.1 s until it is 0 or `timeout` passed; (done, seconds)."""
    started = time.perf_counter()
    left = remaining()
    on_sample(0.0, left)
    if left == 0:
        return True, 0.0
    with bar(description, left) as progress:
        while left > 0 and time.perf_counter() - started < timeout:
            time.sleep(0.1)
            left = remaining()
            on_sample(time.perf_counter() - started, left)
            progress.total = max(progress.total, left)
            progress.update(progress.total - left - progress.n)
    return left == 0, time.perf_counter() - started
