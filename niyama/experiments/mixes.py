"""Workload mixes (paper Table 6): the share of each tier changes, the load
stays fixed above capacity (the paper's 4.5 QPS against its 3.8 capacity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Context, Report, md_table, pyplot, save_figure

PAPER_CAPACITY = 3.8
PAPER = {("70-15-15", "niyama"): 5.0, ("70-15-15", "edf"): 98.0, ("70-15-15", "fcfs"): 100.0,
         ("15-15-70", "niyama"): 0.5, ("15-15-70", "edf"): 82.8, ("15-15-70", "fcfs"): 100.0}


@dataclass
class Params:
    trace: str = "azure-code"
    policies: tuple = ("fcfs", "edf", "niyama")
    mixes: tuple = ("70-15-15", "33-33-33", "15-15-70")
    load: float = 4.5 / PAPER_CAPACITY        # x niyama's capacity (equal mix) on the trace
    duration_h: float = 4.0


QUICK = {"duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.duration_h)
    qps = round(p.load * cap, 3)
    items = [(ctx.scenario(p.trace, pol, p.duration_h, tier_mix=mix), qps) for mix in p.mixes for pol in p.policies]
    runs = ctx.run_points(items, desc="tier mixes")
    rows = []
    for run in runs:
        mix, s = run.scenario.workload_options["tier_mix"], run.summary
        rows.append({"mix": mix, "policy": run.scenario.policy, "qps": qps, "violation_pct": s.violation_pct,
                     **{f"{t.name}_violation_pct": t.violation_pct for t in s.tiers},
                     "relegated": s.relegated, "paper_violation_pct": PAPER.get((mix, run.scenario.policy))})
    tier_names = [t.name for t in runs[0].summary.tiers]
    fig = _plot(rows, p, qps, out / "mixes.png")
    body = [f"Load {qps:g} QPS = {p.load:.2f} x niyama's capacity of {cap:.2f} QPS on {p.trace} (equal mix); the "
            "paper ran 4.5 QPS against 3.8. Mix = shares of Q1-Q2-Q3.", "",
            "Paper (Table 6): 70-15-15 -> QoServe 5% violated vs EDF 98%, FCFS 100%; 15-15-70 -> 0.5% vs 82.8% and "
            "100%.", "",
            md_table(rows, {"mix": "mix", "policy": "policy", "violation_pct": "violated %",
                            **{f"{n}_violation_pct": f"{n} %" for n in tier_names},
                            "paper_violation_pct": "paper %", "relegated": "relegated"})]
    return Report("\n".join(body), {"mixes": rows}, [fig], {"reference_capacity_qps": cap, "qps": qps, "rows": rows})


def _plot(rows, p: Params, qps: float, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(p.policies)
    drawn = False
    for j, pol in enumerate(p.policies):
        xs = [i + (j - (len(p.policies) - 1) / 2) * width for i in range(len(p.mixes))]
        vals = [next(r["violation_pct"] for r in rows if r["mix"] == m and r["policy"] == pol) for m in p.mixes]
        bars = ax.bar(xs, vals, width * 0.92, label=pol)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        for x, m in zip(xs, p.mixes):
            ref = PAPER.get((m, pol))
            if ref is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [ref, ref], color="black", lw=2,
                        label=None if drawn else "paper Table 6")
                drawn = True
    ax.set_xticks(range(len(p.mixes)), [f"Q1-Q2-Q3 = {m}" for m in p.mixes])
    ax.set_ylabel("% requests violated")
    ax.set_ylim(0, 112)
    ax.set_title(f"Tier mixes on {p.trace} at {qps:g} QPS")
    ax.legend(fontsize=8, ncols=4, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
