"""Fit a batch-time profile from measured steps (the engine's step log).

Each row is one executed batch: its features and its measured duration. The
fit is the same two-regime linear model as the shipped profiles,
by least squares per regime; a regime with too few rows borrows the other's
coefficients."""

from __future__ import annotations

import numpy as np

from .linear import FEATURES, LinearCoefficients, TwoRegimeLinear


def features(num_prefill_tokens, num_decodes, decode_context, prefill_context) -> list[float]:
    total = num_prefill_tokens + num_decodes
    return [total, num_prefill_tokens, num_decodes, decode_context, prefill_context]


def fit_two_regime(rows: list[tuple[int, int, int, int, float]], name: str, split: int = 512) -> TwoRegimeLinear:
    """rows: (prefill tokens, decodes, decode context, prefill context, seconds)."""
    if len(rows) < len(FEATURES) + 1:
        raise ValueError(f"need at least {len(FEATURES) + 1} measured steps to fit a profile, got {len(rows)}")
    x = np.array([features(*r[:4]) + [1.0] for r in rows], dtype=float)
    y = np.array([r[4] for r in rows], dtype=float)
    small = x[:, 0] <= split
    fits = {}
    for key, sel in (("small", small), ("large", ~small)):
        if sel.sum() >= len(FEATURES) + 1:
            fits[key] = _lstsq(x[sel], y[sel])
    if not fits:
        fits["small"] = _lstsq(x, y)
    return TwoRegimeLinear(name=name, small=fits.get("small", fits.get("large")),
                           large=fits.get("large", fits.get("small")), split=split)


def _lstsq(x: np.ndarray, y: np.ndarray) -> LinearCoefficients:
    # Scale columns so tiny per-token and per-context coefficients are fitted as well as the intercept.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
    coef = coef / scale
    return LinearCoefficients(**dict(zip(FEATURES, map(float, coef[:-1]))), intercept=float(coef[-1]))


def relative_errors(profile, rows) -> np.ndarray:
    """|predicted - measured| / measured per row."""
    pred = np.array([profile.batch_time(*r[:4]) for r in rows])
    meas = np.array([r[4] for r in rows])
    return np.abs(pred - meas) / meas
