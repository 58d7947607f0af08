"""Per-request records, data first: columns of numpy arrays, then CSV."""

from __future__ import annotations

import csv
from math import nan
from pathlib import Path

import numpy as np

from ..request import Request

STRICT_TOKEN_MISS = 0.01   # strict violation: more than 1% of a Q1 request's tokens miss their deadlines


def token_times(req: Request, iteration_end_s: np.ndarray) -> np.ndarray:
    """Emission time of every output token of a finished request."""
    segs = req.token_segments
    if not segs:                       # rejected at arrival: no tokens
        return np.zeros(0)
    if len(segs) == 1:
        return iteration_end_s[segs[0][0]:segs[0][1]]
    return np.concatenate([iteration_end_s[a:b] for a, b in segs])


def token_miss_fraction(req: Request, times: np.ndarray) -> float:
    """Fraction of tokens 2..N emitted after their deadline A + (n-1) * TBT."""
    if len(times) < 2:
        return 0.0
    deadlines = req.anchor_s + np.arange(1, len(times)) * req.tbt_s
    return float(np.count_nonzero(times[1:] > deadlines + 1e-9)) / (len(times) - 1)


def is_violated(req: Request) -> bool:
    """Artifact definition: interactive if TTFT > target, else TTLT > target. A request rejected at arrival
    was never served, so it is not violated here: summaries count rejections apart."""
    if req.rejected:
        return False
    tier = req.tier
    return req.ttft > tier.ttft_s if tier.interactive else req.ttlt > tier.ttlt_s


def request_records(requests: list[Request], iteration_end_s, long_prompt_threshold: int,
                    with_tokens: bool = True, tbt_by_tier: dict | None = None) -> dict[str, np.ndarray]:
    """Columns, one row per request. `with_tokens=False` skips per-token work (TBT, strict);
    `tbt_by_tier`, if given, collects every token gap per tier name (for pooled percentiles)."""
    ends = np.asarray(iteration_end_s)
    n = len(requests)
    cols = {
        "request_id": np.array([r.request_id for r in requests], dtype=np.int64),
        "tier": np.array([r.tier.name for r in requests]),
        "priority": np.array([r.priority.name.lower() for r in requests]),
        "arrival_s": np.array([r.arrival_s for r in requests]),
        "prompt_tokens": np.array([r.num_prompt_tokens for r in requests], dtype=np.int64),
        "output_tokens": np.array([r.num_output_tokens for r in requests], dtype=np.int64),
        "ttft_s": np.array([nan if r.rejected else r.ttft for r in requests], dtype=float),
        "ttlt_s": np.array([nan if r.rejected else r.ttlt for r in requests], dtype=float),
        "relegated": np.array([r.relegated for r in requests]),
        "rejected": np.array([r.rejected for r in requests], dtype=bool),
        "preemptions": np.array([r.num_preemptions for r in requests], dtype=np.int64),
        "long_prompt": np.array([r.num_prompt_tokens >= long_prompt_threshold for r in requests]),
        "violated": np.array([is_violated(r) for r in requests]),
    }
    if with_tokens:
        tbt_max, tbt_mean, miss = np.zeros(n), np.zeros(n), np.zeros(n)
        for k, r in enumerate(requests):
            times = token_times(r, ends)
            if len(times) > 1:
                gaps = np.diff(times)
                if tbt_by_tier is not None:
                    tbt_by_tier.setdefault(r.tier.name, []).append(gaps)
                tbt_max[k], tbt_mean[k] = gaps.max(), gaps.mean()
                miss[k] = token_miss_fraction(r, times)
        interactive = np.array([r.tier.interactive for r in requests])
        cols["tbt_max_s"] = tbt_max
        cols["tbt_mean_s"] = tbt_mean
        cols["token_miss_frac"] = miss
        cols["violated_strict"] = cols["violated"] | (interactive & (miss > STRICT_TOKEN_MISS))
    return cols


def write_records_csv(records: dict[str, np.ndarray], path: "str | Path") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(records)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for row in zip(*(records[k].tolist() for k in names)):
            w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
    return path
