"""The hybrid-priority weight alpha (paper Fig. 14): 0 is EDF on the
first-token deadline; larger values favour requests with little prefill left."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Context, Report, md_table, pyplot, save_figure

PAPER = ("Paper (Fig. 14): small alpha behaves like EDF and collapses at high load; large alpha tends to "
         "shortest-remaining-prefill-first and hurts long requests; the paper picks alpha to balance the two and "
         "notes it could adapt to load (about 1 ms/token at low load); the default is 8 ms/token.")


@dataclass
class Params:
    trace: str = "azure-code"
    alphas_ms: tuple = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
    loads: tuple = (1.0, 1.2)            # x niyama's capacity on the trace
    duration_h: float = 4.0


QUICK = {"alphas_ms": (0.0, 8.0, 16.0), "duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.duration_h)
    grid = [(f, a) for f in p.loads for a in p.alphas_ms]
    items = [(ctx.scenario(p.trace, "niyama", p.duration_h, policy_opts={"alpha_s": a / 1000}), round(f * cap, 3))
             for f, a in grid]
    runs = ctx.run_points(items, desc="alpha sweep")
    rows = []
    for (load, alpha), run in zip(grid, runs):
        rec, s = run.records, run.summary
        rows.append({"load": load, "qps": run.qps, "alpha_ms": alpha,
                     "ttft_p50_s": float(np.percentile(rec["ttft_s"], 50)),
                     "ttft_p99_s": float(np.percentile(rec["ttft_s"], 99)),
                     "q1_ttft_p50_s": s.tiers[0].ttft_s[0], "q1_ttft_p99_s": s.tiers[0].ttft_s[2],
                     "violation_pct": s.violation_pct, "short_violation_pct": s.short_violation_pct,
                     "long_violation_pct": s.long_violation_pct, "relegated": s.relegated})
    fig = _plot(rows, p, out / "alpha.png")
    body = [PAPER, "", f"Loads are fractions of niyama's capacity ({cap:.2f} QPS on {p.trace} at alpha = 8 ms). "
            f"Latency: TTFT, which is what the prefill order that alpha sets changes; the picture shows the interactive "
            f"tier ({runs[0].summary.tiers[0].name}), whose TTFT is its target; the table also has all requests.", "",
            md_table(rows, {"load": "x capacity", "qps": "QPS", "alpha_ms": "alpha (ms/token)",
                            "q1_ttft_p50_s": f"{runs[0].summary.tiers[0].name} TTFT p50 (s)",
                            "q1_ttft_p99_s": f"{runs[0].summary.tiers[0].name} TTFT p99 (s)",
                            "ttft_p50_s": "all TTFT p50 (s)", "ttft_p99_s": "all TTFT p99 (s)", "violation_pct": "violated %",
                            "short_violation_pct": "short %", "long_violation_pct": "long %",
                            "relegated": "relegated"})]
    return Report("\n".join(body), {"alpha": rows}, [fig], {"reference_capacity_qps": cap, "rows": rows})


def _plot(rows, p: Params, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for load in p.loads:
        pr = sorted((r for r in rows if r["load"] == load), key=lambda r: r["alpha_ms"])
        x = [r["alpha_ms"] for r in pr]
        for ax, key in zip(axes, ("q1_ttft_p50_s", "q1_ttft_p99_s", "violation_pct", "long_violation_pct")):
            ax.plot(x, [r[key] for r in pr], "-o", ms=3, label=f"{load:g} x capacity ({pr[0]['qps']:g} QPS)")
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax, title in zip(axes, ("interactive tier TTFT p50 (s)", "interactive tier TTFT p99 (s)", "% violated",
                                "% long-prompt requests violated")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("alpha (ms per prefill token)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Hybrid priority weight on {p.trace}")
    fig.tight_layout()
    return save_figure(fig, path)
