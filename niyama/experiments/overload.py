"""Transient overload with priority hints (paper Figs. 12/13).

The load alternates between a low and a high level every 15 minutes for 4
hours; 20% of each tier's requests carry the `low` priority hint. The two
levels are fractions of niyama's capacity on the trace, the way the paper's
2.0 and 5.0 QPS relate to its QoServe capacity of 3.8 QPS on Azure Code
(Fig. 7). niyama relegates `low` requests first;
`niyama-no-priority` is the same policy blind to the hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Context, Report, md_table, pyplot, save_figure, tier_metric

PAPER_CAPACITY = 3.8      # QoServe on Azure Code, Fig. 7; the diurnal levels were 2.0 and 5.0 QPS
PAPER = {"fcfs": 81.9, "edf": 84.1, "niyama": 8.64}   # % violated overall; niyama: 0% of important


@dataclass
class Params:
    trace: str = "azure-code"
    policies: tuple = ("fcfs", "edf", "niyama-no-priority", "niyama")
    low_load: float = 2.0 / PAPER_CAPACITY      # x niyama's capacity on the trace
    high_load: float = 5.0 / PAPER_CAPACITY
    period_min: float = 15.0
    duration_h: float = 4.0
    low_priority: float = 0.2
    window_s: float = 60.0


QUICK = {"duration_h": 1.0}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.duration_h)
    lo, hi = round(p.low_load * cap, 3), round(p.high_load * cap, 3)
    scenarios = [ctx.scenario(p.trace, pol, p.duration_h, arrival="diurnal", diurnal_qps=(lo, hi),
                              diurnal_period_s=p.period_min * 60, low_priority_fraction=p.low_priority)
                 for pol in p.policies]
    runs = ctx.run_points([(sc, None) for sc in scenarios], desc="diurnal overload")
    tiers = scenarios[0].workload(None).tiers
    rows, series = [], []
    for pol, run in zip(p.policies, runs):
        rec, s = run.records, run.summary
        important = rec["priority"] == "important"
        releg = rec["relegated"]
        row = {"policy": pol, "requests": s.num_requests, "violation_pct": s.violation_pct,
               "important_violation_pct": _pct(rec["violated"][important]),
               "low_violation_pct": _pct(rec["violated"][~important]),
               **{f"{t.name}_violation_pct": ts.violation_pct for t, ts in zip(tiers, s.tiers)},
               "strict_violation_pct": s.strict_violation_pct,
               "relegated": int(releg.sum()), "relegated_important": int((releg & important).sum()),
               "relegated_completed": int(np.isfinite(rec["ttlt_s"][releg]).sum()),
               "max_relegated_ttft_s": float(rec["ttft_s"][releg].max()) if releg.any() else None,
               "max_relegated_ttlt_s": float(rec["ttlt_s"][releg].max()) if releg.any() else None,
               "backlog_s": s.backlog_s, "paper_violation_pct": PAPER.get(pol)}
        rows.append(row)
        series += _windows(pol, rec, tiers, p.window_s)
    fig = _plot(series, p, tiers, lo, hi, out / "overload.png")
    body = [f"Load alternates {lo:g} / {hi:g} QPS every {p.period_min:g} min ({p.low_load:.2f} / {p.high_load:.2f} "
            f"x niyama's capacity of {cap:.2f} QPS on {p.trace}; the paper ran 2.0 / 5.0 QPS against 3.8), "
            f"{100 * p.low_priority:g}% of each tier `low`.", "",
            "Paper (Figs. 12/13): QoServe 8.64% violated overall and 0% of important requests; FCFS 81.9%, "
            "EDF 84.1%.", "",
            md_table(rows, {"policy": "policy", "violation_pct": "overall %", "important_violation_pct": "important %",
                            "low_violation_pct": "low %", **{f"{t.name}_violation_pct": f"{t.name} %" for t in tiers},
                            "paper_violation_pct": "paper overall %", "relegated": "relegated",
                            "relegated_important": "of them important", "max_relegated_ttlt_s":
                            "longest relegated TTLT (s)", "backlog_s": "backlog (s)"}), "",
            "Every relegated request completed: " + ", ".join(
                f"{r['policy']} {r['relegated_completed']}/{r['relegated']}" for r in rows) + ".",
            f"The picture shows each tier's p99 latency in {p.window_s:g} s windows of arrival time."]
    results = {"reference_capacity_qps": cap, "low_qps": lo, "high_qps": hi, "rows": rows}
    return Report("\n".join(body), {"overload": rows, "overload_windows": series}, [fig], results)


def _pct(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean()) if len(mask) else 0.0


def _windows(policy: str, rec, tiers, window_s: float) -> list[dict]:
    """p99 of each tier's latency, and of latency/target by priority, per window of arrival time."""
    win = np.floor(rec["arrival_s"] / window_s).astype(int)
    out = []
    for w in np.unique(win):
        m = win == w
        row = {"policy": policy, "window_start_s": float(w * window_s), "arrivals": int(m.sum())}
        norm, prio = [], []
        for t in tiers:
            col, _, target = tier_metric(t)
            mt = m & (rec["tier"] == t.name)
            row[f"{t.name}_p99_s"] = float(np.percentile(rec[col][mt], 99)) if mt.any() else None
            norm.append(rec[col][mt] / target)
            prio.append(rec["priority"][mt])
        norm, prio = np.concatenate(norm), np.concatenate(prio)
        for level in ("important", "low"):
            sel = norm[prio == level]
            row[f"{level}_p99_of_target"] = float(np.percentile(sel, 99)) if len(sel) else None
        out.append(row)
    return out


def _plot(series, p: Params, tiers, lo: float, hi: float, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(tiers) + 1, 1, figsize=(11, 2.6 * (len(tiers) + 1)), sharex=True)
    colors = dict(zip(p.policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    period = p.period_min * 60
    for ax in axes:
        for k in range(1, int(np.ceil(p.duration_h * 3600 / period)), 2):
            ax.axvspan(k * period / 60, (k + 1) * period / 60, color="0.9", lw=0)
    for j, t in enumerate(tiers):
        _, label, target = tier_metric(t)
        ax = axes[j]
        for pol in p.policies:
            pts = [(r["window_start_s"] / 60, r[f"{t.name}_p99_s"]) for r in series
                   if r["policy"] == pol and r[f"{t.name}_p99_s"] is not None]
            ax.plot(*zip(*pts), color=colors[pol], lw=1, label=pol, ls="--" if pol.endswith("no-priority") else "-")
        ax.axhline(target, color="black", ls=":", lw=1, label="target")
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"{label}, p99 per {p.window_s:g} s window (shaded: {hi:g} QPS, else {lo:g} QPS)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncols=len(p.policies) + 1)
    ax = axes[-1]
    pol = "niyama" if "niyama" in p.policies else p.policies[-1]
    for level, ls in (("important", "-"), ("low", "--")):
        pts = [(r["window_start_s"] / 60, r[f"{level}_p99_of_target"]) for r in series
               if r["policy"] == pol and r[f"{level}_p99_of_target"] is not None]
        ax.plot(*zip(*pts), ls, color=colors[pol], lw=1, label=f"{pol}, {level}")
    ax.axhline(1.0, color="black", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("latency / target")
    ax.set_title(f"{pol}: p99 of latency / target by priority hint", fontsize=9)
    ax.set_xlabel("minutes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
