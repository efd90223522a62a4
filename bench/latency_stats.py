"""Statistics shared by the latency benchmarks (bench/server.py, bench/fair_steps.py).

Pure functions on lists of seconds or ratios, no model and no compiled module, so the fast test
tier checks them directly.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (NaN for no values): an observed value, never an
    interpolation, so a p99 of a few dozen gaps is the worst gap but one, not a blend."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(math.ceil(q / 100 * len(ordered))) - 1))
    return ordered[index]


def gaps_in_window(stamps: Sequence[float], start: float, end: float) -> List[float]:
    """The gaps between consecutive token times of one stream that overlap ``[start, end]``.

    A gap counts when it ends after ``start`` and begins before ``end``: the gap the window
    opened in and the one it closed in are the reader's wait too, so a stall that spans the
    whole window is one long gap, not none."""
    return [later - earlier for earlier, later in zip(stamps, stamps[1:]) if later > start and earlier < end]


def gaps_before(stamps: Sequence[float], start: float) -> List[float]:
    """The gaps that ended before ``start``: the stream's steady pace before anything joined."""
    return [later - earlier for earlier, later in zip(stamps, stamps[1:]) if later <= start]


def geometric_mean_interval(ratios: Sequence[float]) -> Dict[str, float]:
    """Geometric mean of ``ratios`` with a 95 % interval (normal on the logs), min and max.

    The interval's bounds are NaN for fewer than two ratios."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    return {"mean": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half),
            "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def format_ratio(summary: Dict[str, float]) -> str:
    """``1.023 (95% 0.987-1.061; 0.95-1.10, n=4)``: the geometric mean, its interval, the range."""
    if summary["n"] < 2:
        return f"{summary['mean']:.3f} (n=1)"
    return (f"{summary['mean']:.3f} (95% {summary['low']:.3f}-{summary['high']:.3f}; "
            f"{summary['min']:.2f}-{summary['max']:.2f}, n={summary['n']})")


def rotated(items: Sequence[str], round_index: int) -> List[str]:
    """``items`` starting at position ``round_index`` (mod len): each one leads a round in turn,
    so none always runs first, on a cold machine, or right after the same neighbour."""
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])
