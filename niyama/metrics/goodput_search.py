"""Goodput search: the highest QPS whose worst tier has <= 1% violations.

Coarse to fine: step the load by a factor from a start guess until one
point passes and one fails, bisect that bracket until it is narrow, then
interpolate linearly between the last passing and the first failing point
to exactly the target. The search only needs `evaluate(qps) -> violation %`,
so it is tested on plain functions.

Sustainable capacity: the highest load that still passes, and keeps the
backlog (last completion - last arrival) under the shortest TTLT, when the
run is twice as long. Long runs are what make Q2/Q3 backlogs show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Point:
    qps: float
    violation_pct: float          # worst tier, artifact definition
    passed: bool
    backlog_s: float = 0.0
    detail: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    qps: float                    # interpolated capacity (0 if even the lowest load fails)
    points: list[Point]
    lo: Point | None              # last passing point
    hi: Point | None              # first failing point


def interpolate(lo: Point, hi: Point, target_pct: float) -> float:
    """Load at which the violation % crosses `target_pct`, linearly between lo and hi."""
    if hi.violation_pct == lo.violation_pct:
        return lo.qps
    q = lo.qps + (target_pct - lo.violation_pct) * (hi.qps - lo.qps) / (hi.violation_pct - lo.violation_pct)
    return min(max(q, lo.qps), hi.qps)


def search_capacity(evaluate: Callable[[float], Point], start_qps: float, *, target_pct: float = 1.0,
                    step: float = 1.3, rel_tol: float = 0.03, max_points: int = 24,
                    min_qps: float = 0.01, max_qps: float = 1000.0) -> SearchResult:
    """`evaluate(qps)` runs one load and returns its Point (passed = violation <= target)."""
    if start_qps <= 0 or step <= 1 or rel_tol <= 0:
        raise ValueError("start_qps > 0, step > 1 and rel_tol > 0 are required")
    points: list[Point] = []

    def run(q: float) -> Point:
        p = evaluate(q)
        points.append(p)
        return p

    lo = hi = None
    p = run(start_qps)
    if p.passed:
        lo = p
        while hi is None and len(points) < max_points and lo.qps * step <= max_qps:
            p = run(lo.qps * step)
            if p.passed:
                lo = p
            else:
                hi = p
    else:
        hi = p
        while lo is None and len(points) < max_points and hi.qps / step >= min_qps:
            p = run(hi.qps / step)
            if p.passed:
                lo = p
            else:
                hi = p
    if lo is None:
        return SearchResult(0.0, points, None, hi)
    if hi is None:   # never failed within the limits: capacity is at least lo
        return SearchResult(lo.qps, points, lo, None)
    while hi.qps / lo.qps - 1 > rel_tol and len(points) < max_points:
        p = run(0.5 * (lo.qps + hi.qps))
        if p.passed:
            lo = p
        else:
            hi = p
    return SearchResult(interpolate(lo, hi, target_pct), points, lo, hi)


def search_sustainable(evaluate_long: Callable[[float], Point], capacity_qps: float, *, step: float = 1.15,
                       rel_tol: float = 0.03, max_points: int = 8) -> SearchResult:
    """Highest passing load of the longer runs, searched downward from the capacity."""
    points: list[Point] = []
    if capacity_qps <= 0:
        return SearchResult(0.0, points, None, None)
    hi = None
    q = capacity_qps
    while len(points) < max_points:
        p = evaluate_long(q)
        points.append(p)
        if p.passed:
            lo = p
            break
        hi = p
        q /= step
    else:
        return SearchResult(0.0, points, None, hi)
    while hi is not None and hi.qps / lo.qps - 1 > rel_tol and len(points) < max_points:
        p = evaluate_long(0.5 * (lo.qps + hi.qps))
        points.append(p)
        if p.passed:
            lo = p
        else:
            hi = p
    return SearchResult(lo.qps, points, lo, hi)


def start_guess(mean_prompt: float, mean_output: float, prefill_s_per_token: float,
                decode_s_per_token: float = 4e-5) -> float:
    """Half the load that would keep the GPU busy at peak prefill throughput: a first probe."""
    work_s = mean_prompt * prefill_s_per_token + mean_output * decode_s_per_token
    return 0.5 / work_s if work_s > 0 else 1.0


def round_qps(q: float) -> float:
    """Probe loads on a 3-significant-digit grid, so reports stay readable."""
    if q <= 0:
        return q
    digits = 2 - int(math.floor(math.log10(q)))
    return round(q, digits)
