"""Arrival processes. All take unit-rate gaps so the same seed gives the same
sequence at every load, only scaled (common random numbers make goodput
curves smooth)."""

from __future__ import annotations

import numpy as np

GAP_CAP = 8.0   # inter-arrival gaps are capped at 8 / QPS (artifact's Poisson generator)


def unit_gaps(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(rng.exponential(1.0, n), GAP_CAP)


def poisson(n: int, qps: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times (s), the first at 0, Poisson at `qps` with capped gaps."""
    if qps <= 0:
        raise ValueError("qps must be > 0")
    gaps = unit_gaps(n, rng) / qps
    return np.concatenate(([0.0], np.cumsum(gaps[:-1]))) if n else np.zeros(0)


def diurnal(duration_s: float, low_qps: float, high_qps: float, period_s: float,
            rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals whose rate alternates low/high every `period_s`, over `duration_s`.

    Unit-rate arrivals in "operational time" are mapped through the inverse
    of the cumulative rate, so each period gets its own rate exactly.
    """
    if min(low_qps, high_qps) <= 0 or period_s <= 0 or duration_s <= 0:
        raise ValueError("rates, period and duration must be > 0")
    num_periods = int(np.ceil(duration_s / period_s))
    rates = np.array([low_qps if k % 2 == 0 else high_qps for k in range(num_periods)])
    cum = np.concatenate(([0.0], np.cumsum(rates * period_s)))       # operational time at period edges
    expected = cum[-1]
    n = int(expected + 10 * np.sqrt(expected) + 10)
    op = np.concatenate(([0.0], np.cumsum(unit_gaps(n, rng)[:-1])))
    op = op[op < expected]
    k = np.searchsorted(cum, op, side="right") - 1
    t = k * period_s + (op - cum[k]) / rates[k]
    return t[t < duration_s]
