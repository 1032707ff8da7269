"""Percentiles (nearest rank) and latency summaries in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (no interpolation)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(
    seconds: Iterable[float], keys: Sequence[str] = ("p50", "p95", "p99", "max")
) -> dict[str, float | None]:
    ordered = sorted(seconds)
    out: dict[str, float | None] = {"count": len(ordered)}
    for key in keys:
        if key == "max":
            value = ordered[-1] if ordered else math.nan
        elif key == "mean":
            value = sum(ordered) / len(ordered) if ordered else math.nan
        else:
            value = percentile(ordered, float(key[1:]))
        out[key] = round(value * 1000, 3) if ordered else None
    return out
