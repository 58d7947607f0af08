"""Load sweep (paper Figs. 10/11): latency and violations of each policy as
the load rises past capacity, per tier and for short vs long prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Context, Report, md_table, pyplot, save_figure, tier_metric

PAPER = ("Paper (Figs. 10/11, Azure Code 2024, ~2-6 QPS): QoServe meets each tier's tail-latency target at up to "
         "40% higher load than the next best and keeps zero violations up to 30% higher load than EDF; SRPF "
         "violates long requests even below 2 QPS; average TBT violations stay under 0.1% for all.")


@dataclass
class Params:
    trace: str = "azure-code"
    policies: tuple = ("fcfs", "srpf", "edf", "niyama")
    qps: tuple = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)
    duration_h: float = 4.0


QUICK = {"qps": (2.0, 4.0, 6.0), "duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    runs = ctx.run_points([(ctx.scenario(p.trace, pol, p.duration_h), q) for pol in p.policies for q in p.qps],
                          desc="load sweep")
    tiers = runs[0].scenario.workload(p.qps[0]).tiers
    rows = []
    for r in runs:
        s, rec = r.summary, r.records
        row = {"policy": r.scenario.policy, "qps": r.qps, "requests": s.num_requests,
               "violation_pct": s.violation_pct, "strict_violation_pct": s.strict_violation_pct,
               "short_violation_pct": s.short_violation_pct, "long_violation_pct": s.long_violation_pct,
               "relegated": s.relegated, "backlog_s": s.backlog_s}
        for t, ts in zip(tiers, s.tiers):
            col, _, _ = tier_metric(t)
            lat = ts.ttft_s if col == "ttft_s" else ts.ttlt_s
            row[f"{t.name}_p50_s"], row[f"{t.name}_p95_s"] = lat[0], lat[1]
            row[f"{t.name}_violation_pct"] = ts.violation_pct
            if t.interactive:
                m = rec["tier"] == t.name
                row[f"{t.name}_tbt_p95_ms"] = ts.tbt_s[1] * 1000
                row[f"{t.name}_late_token_pct"] = 100.0 * float(np.mean(rec["token_miss_frac"][m])) if m.any() else 0.0
        rows.append(row)

    derived = [_derive(pol, [r for r in rows if r["policy"] == pol], tiers) for pol in p.policies]
    fig = _plot(rows, p, tiers, out / "load_sweep.png")
    body = [PAPER, "", "Per policy, over the sweep (highest swept load that passes; '<' = even the lowest fails):", "",
            md_table(derived, {"policy": "policy", "tail_ok_qps": "all tiers p95 within target",
                               "zero_violation_qps": "zero violations", "long_violation_at_min_qps":
                               f"long-prompt violations at {min(p.qps):g} QPS (%)", "max_late_token_pct":
                               "worst average late-token % (Q1)"}), "",
            _compare(derived), "",
            "Every point:", "",
            md_table(rows, {"policy": "policy", "qps": "QPS", "violation_pct": "viol %", "short_violation_pct":
                            "short %", "long_violation_pct": "long %",
                            **{f"{t.name}_violation_pct": f"{t.name} %" for t in tiers},
                            **{f"{t.name}_p95_s": f"{tier_metric(t)[1]} p95 (s)" for t in tiers}})]
    results = {"derived": derived, "points": rows}
    return Report("\n".join(body), {"load_sweep": rows, "load_sweep_derived": derived}, [fig], results)


def _derive(policy: str, rows: list[dict], tiers) -> dict:
    rows = sorted(rows, key=lambda r: r["qps"])

    def highest(ok) -> str | float:
        passing = [r["qps"] for r in rows if ok(r)]
        if not passing:
            return f"< {rows[0]['qps']:g}"
        return max(passing)
    tail_ok = lambda r: all(r[f"{t.name}_p95_s"] <= tier_metric(t)[2] for t in tiers)
    late = [r[k] for r in rows for k in r if k.endswith("_late_token_pct")]
    return {"policy": policy, "tail_ok_qps": highest(tail_ok),
            "zero_violation_qps": highest(lambda r: r["violation_pct"] == 0.0),
            "long_violation_at_min_qps": rows[0]["long_violation_pct"],
            "max_late_token_pct": max(late) if late else 0.0}


def _compare(derived: list[dict]) -> str:
    by = {d["policy"]: d for d in derived}
    if "niyama" not in by:
        return ""
    out = []
    for key, what in (("tail_ok_qps", "tail-latency targets"), ("zero_violation_qps", "zero violations")):
        others = [d[key] for pol, d in by.items() if pol != "niyama" and isinstance(d[key], float)]
        mine = by["niyama"][key]
        if others and isinstance(mine, float):
            best = max(others)
            out.append(f"niyama holds {what} up to {mine:g} QPS vs {best:g} for the next best "
                       f"({100 * (mine / best - 1):+.0f}%; grid resolution limits this).")
    return " ".join(out)


def _plot(rows, p: Params, tiers, path: Path) -> Path:
    plt = pyplot()
    n = len(tiers)
    fig, axes = plt.subplots(3, max(n, 3), figsize=(4.2 * max(n, 3), 10), squeeze=False)
    colors = dict(zip(p.policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for pol in p.policies:
        pr = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["qps"])
        x = [r["qps"] for r in pr]
        for j, t in enumerate(tiers):
            ax = axes[0][j]
            ax.plot(x, [r[f"{t.name}_p95_s"] for r in pr], "-o", ms=3, color=colors[pol], label=f"{pol} p95")
            ax.plot(x, [r[f"{t.name}_p50_s"] for r in pr], "--", color=colors[pol], alpha=0.6)
            axes[1][j].plot(x, [r[f"{t.name}_violation_pct"] for r in pr], "-o", ms=3, color=colors[pol], label=pol)
        for j, (key, name) in enumerate((("violation_pct", "all requests"), ("short_violation_pct", "short prompts"),
                                         ("long_violation_pct", "long prompts (>= p90)"))):
            axes[2][j].plot(x, [r[key] for r in pr], "-o", ms=3, color=colors[pol], label=pol)
            axes[2][j].set_title(f"violations, {name}")
    for j, t in enumerate(tiers):
        _, label, target = tier_metric(t)
        ax = axes[0][j]
        ax.axhline(target, color="black", lw=1, ls=":", label="target")
        ax.set_yscale("log")
        ax.set_title(f"{label}: p95 (solid), p50 (dashed)")
        ax.set_ylabel("seconds")
        axes[1][j].set_title(f"{t.name} violations")
    for ax in list(axes[1]) + list(axes[2]):
        ax.set_ylabel("% violated")
        ax.set_ylim(-3, 103)
    for row in axes:
        for ax in row:
            ax.set_xlabel("load (QPS)")
            ax.grid(alpha=0.3)
    for j in range(axes.shape[1]):
        for i in (0, 1):
            axes[i][j].set_visible(j < n)
        axes[2][j].set_visible(j < 3)
    axes[0][0].legend(fontsize=7)
    axes[2][0].legend(fontsize=7)
    fig.suptitle(f"Load sweep on {p.trace} ({p.duration_h:g} h of arrivals per point)")
    fig.tight_layout()
    return save_figure(fig, path)
