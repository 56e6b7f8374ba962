"""Summaries of latency samples: min, percentiles, max, in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "summary"]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100).

    Nearest rank, not interpolation: the answer is always a sample that really
    happened, and with 20 samples p95/p99 are honestly the worst ones.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(values_ms: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """n, min, p50, p95, p99, max and mean of samples in ms; None fields when empty."""
    ordered = sorted(values_ms)
    if not ordered:
        return {"n": 0, "min": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "n": len(ordered),
        "min": round(ordered[0], digits),
        "p50": round(percentile(ordered, 50), digits),
        "p95": round(percentile(ordered, 95), digits),
        "p99": round(percentile(ordered, 99), digits),
        "max": round(ordered[-1], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
    }
