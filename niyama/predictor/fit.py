"""Fit batch-time profiles from measured steps (`niyama profile`'s CSV, a replay's step log).

Each row is one executed batch: (prefill tokens, decodes, decode context sum, prefill context, seconds,
and optionally sampled rows: those drawn with temperature or penalties; absent means 0).

- `fit_two_regime`: the shipped profiles' model, the paper's and its artifact's: least squares per regime
  (<= 512 total tokens and above); a regime with too few rows borrows the other's coefficients.
- `fit_spline`: one linear spline in total tokens plus attention's costs (spline.py), fitted to
  minimise relative error (least squares of (predicted - measured) / measured).

`split_by_shape` holds out whole shapes, `error_summary` scores a model on rows.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np

from .linear import FEATURES, LinearCoefficients, TwoRegimeLinear
from .spline import LinearSpline

KNOTS = (64, 128, 256, 512, 1024, 2048)     # powers of two; a fit keeps those inside its rows' totals
KINDS = ("decode", "prefill", "mixed")


def kind(num_prefill_tokens: int, num_decodes: int) -> str:
    return "mixed" if num_prefill_tokens and num_decodes else "prefill" if num_prefill_tokens else "decode"


def sampled(row: tuple) -> int:
    """A row's sampled rows (0 for rows measured without the column)."""
    return row[5] if len(row) > 5 else 0


def shape(row: tuple) -> tuple:
    """What the predictor sees of a row: everything but the time."""
    return (*row[:4], sampled(row))


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


def fit_spline(rows: list[tuple[int, int, int, int, float]], name: str, knots: tuple[int, ...] = KNOTS
               ) -> LinearSpline:
    """Least squares of the relative error (each row weighted by 1 / its time). The knots kept are those
    with measured totals on both sides; the attention, context and sampled-row coefficients, costs, are kept
    >= 0 (a negative one is dropped and the rest refitted)."""
    p, d, dctx, pctx, y = (np.array([r[i] for r in rows], dtype=float) for i in range(5))
    s = np.array([sampled(r) for r in rows], dtype=float)
    total = p + d
    knots = tuple(k for k in knots if (total < k).any() and (total > k).sum() >= 2)
    cols = {"intercept": np.ones_like(y), "total_tokens": total,
            **{f"h{k}": np.maximum(0.0, total - k) for k in knots},
            "prefill_step": (p > 0).astype(float), "decode_step": (d > 0).astype(float), "decodes": d,
            "decode_context": dctx, "prefill_context": pctx, "chunk_context_pairs": p * pctx,
            "chunk_self_pairs": p * p / 2, "sampled": s}
    if len(rows) < len(cols):
        raise ValueError(f"need at least {len(cols)} measured steps to fit a linear spline, got {len(rows)}")
    if (y <= 0).any():
        raise ValueError("measured times must be > 0")
    nonneg = ("decode_context", "prefill_context", "chunk_context_pairs", "chunk_self_pairs", "sampled")
    used = [c for c in cols if cols[c].any() or c == "intercept"]
    while True:
        x = np.stack([cols[c] for c in used], axis=1) / y[:, None]
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        coef, *_ = np.linalg.lstsq(x / scale, np.ones_like(y), rcond=None)
        coef = dict(zip(used, coef / scale))
        bad = [c for c in nonneg if coef.get(c, 0.0) < 0]
        if not bad:
            break
        used.remove(min(bad, key=lambda c: coef[c] * np.abs(cols[c]).max()))
    c = {col: float(coef.get(col, 0.0)) for col in cols}
    return LinearSpline(name=name, knots=knots, intercept=c["intercept"], total_tokens=c["total_tokens"],
                        hinges=tuple(c[f"h{k}"] for k in knots), prefill_step=c["prefill_step"],
                        decode_step=c["decode_step"], decodes=c["decodes"],
                        decode_context=c["decode_context"], prefill_context=c["prefill_context"],
                        chunk_context_pairs=c["chunk_context_pairs"], chunk_self_pairs=c["chunk_self_pairs"],
                        max_total=int(total.max()), min_s=float(y.min()) / 2, sampled=c["sampled"])


def relative_errors(profile, rows) -> np.ndarray:
    """|predicted - measured| / measured per row."""
    pred = np.array([profile.batch_time(*r[:4], sampled(r)) for r in rows])
    meas = np.array([r[4] for r in rows])
    return np.abs(pred - meas) / meas


def split_by_shape(rows: list[tuple], test_share: float, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """(train, held out): `test_share` of the distinct shapes of each kind (decode-only, prefill-only,
    mixed) are held out with every row of theirs, so no held-out shape was seen in training."""
    if not 0 < test_share < 1:
        raise ValueError("the held-out share must be in (0, 1)")
    rng = random.Random(seed)
    held = set()
    for k in KINDS:
        shapes = sorted({shape(r) for r in rows if kind(r[0], r[1]) == k})
        rng.shuffle(shapes)
        held.update(shapes[:round(len(shapes) * test_share)])
    return [r for r in rows if shape(r) not in held], [r for r in rows if shape(r) in held]


def error_summary(profile, rows) -> dict[str, dict[str, float]]:
    """Per kind of step and over all rows: number of rows, mean / p95 / max relative error."""
    out = {}
    for k in ("all",) + KINDS:
        sel = [r for r in rows if k == "all" or kind(r[0], r[1]) == k]
        if sel:
            err = relative_errors(profile, sel)
            out[k] = {"rows": len(sel), "mape": float(err.mean()), "p95": float(np.percentile(err, 95)),
                      "max": float(err.max())}
    return out


def meta_path(csv_path: Path) -> Path:
    """The sidecar JSON of a `niyama profile` CSV: device, model, dtype, versions, settings."""
    return Path(csv_path).with_suffix(".meta.json")


# replay's steps.csv (niyama/engine/trace_replay.py STEP_COLUMNS): the steps of a serving run, as the loop ran them
STEP_LOG_COLUMNS = ("prefill_tokens", "decodes", "decode_context", "prefill_context", "seconds")


def read_steps(path: Path, column: str = "wall_s") -> list[tuple]:
    """Rows (prefill tokens, decodes, decode context, prefill context, seconds, sampled rows) of a `niyama
    profile` CSV (`column`: wall_s, wall_min_s or gpu_s; rows without a value are left out) or of a replay's
    steps.csv (its measured `seconds`). A file without the `sampled` column reads as 0 sampled rows."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = set(reader.fieldnames or ())
        if set(STEP_LOG_COLUMNS) <= names:
            column = "seconds"
        need = {"prefill_tokens", "prefill_context", "decodes", "decode_context", column}
        if not need <= names:
            raise ValueError(f"{path}: not a `niyama profile` CSV nor a replay's steps.csv (needs columns "
                             f"{', '.join(sorted(need))})")
        rows = [(int(r["prefill_tokens"]), int(r["decodes"]), int(r["decode_context"]), int(r["prefill_context"]),
                 float(r[column]), int(r.get("sampled") or 0)) for r in reader if r[column]]
    if not rows:
        raise ValueError(f"{path}: no rows with a {column} value")
    return rows
