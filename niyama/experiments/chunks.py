"""Dynamic chunking at work (paper Fig. 9): the token budget niyama picks
each iteration beside the slack of the running decodes that sizes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Context, Report, md_table, pyplot, save_figure


@dataclass
class Params:
    trace: str = "azure-code"
    policy: str = "niyama"
    load: float = 0.8                 # x niyama's capacity on the trace
    iterations: int = 200
    start_iteration: int = -1         # -1: the busiest window (most iterations with a prefill beside decodes)
    duration_h: float = 4.0


QUICK = {"duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.duration_h)
    qps = round(p.load * cap, 3)
    steps = []

    def record(plan, result, end):
        steps.append((plan.iteration, end, plan.token_budget, plan.num_prefill_tokens, plan.num_decodes,
                      plan.min_slack_s, result.duration_s, len(plan.prefills) > 0))
    sim = ctx.scenario(p.trace, p.policy, p.duration_h).simulate(qps, on_step=record)
    it, end, budget, prefill, decodes, slack, dur, has_prefill = (np.array(c) for c in zip(*steps))
    busy = has_prefill & (decodes > 0)          # a prefill competed with running decodes
    if p.start_iteration >= 0:
        start = p.start_iteration
    else:
        counts = np.convolve(busy.astype(int), np.ones(min(p.iterations, len(busy)), dtype=int), mode="valid")
        start = int(np.argmax(counts))
    sel = slice(start, min(start + p.iterations, len(it)))
    rows = [{"iteration": int(it[k]), "end_s": float(end[k]), "token_budget": int(budget[k]),
             "prefill_tokens": int(prefill[k]), "decodes": int(decodes[k]), "prefill_waiting": bool(has_prefill[k]),
             "min_slack_ms": float(slack[k] * 1000) if np.isfinite(slack[k]) else None,
             "batch_ms": float(dur[k] * 1000)} for k in range(sel.start, sel.stop)]
    values, counts = np.unique(budget[busy], return_counts=True)
    hist = [{"token_budget": int(v), "iterations": int(c), "share_pct": 100.0 * c / counts.sum()}
            for v, c in zip(values, counts)]
    w_budget = budget[sel][has_prefill[sel]]      # iterations without a prefill chose nothing
    small, large = busy & (budget <= 512), busy & (budget >= 2048)
    slack_small = float(np.median(slack[small]) * 1000) if small.any() else float("nan")
    slack_large = float(np.median(slack[large]) * 1000) if large.any() else float("nan")
    fig = _plot(rows, p, qps, out / "chunks.png")
    s = sim
    body = [f"{p.policy} on {p.trace} at {qps:g} QPS ({p.load:g} x its capacity of {cap:.2f}); iterations "
            f"{rows[0]['iteration']}..{rows[-1]['iteration']} of {s.num_iterations}.", "",
            "Paper (Fig. 9): the chunk size moves between 128 and 2552 tokens iteration by iteration, large when "
            "the tightest decode has slack and small when it does not.", "",
            f"In the window: token budget {int(w_budget.min())}..{int(w_budget.max())} (median "
            f"{np.median(w_budget):g}) in the {len(w_budget)} iterations that ran a prefill. Over the run, the median min slack was {slack_small:.0f} ms in iterations "
            f"that chose <= 512 tokens and {slack_large:.0f} ms in those that chose >= 2048.", "",
            "Token budgets over the whole run, in iterations where a prefill ran beside decodes:", "",
            md_table(hist, {"token_budget": "token budget", "iterations": "iterations", "share_pct": "share %"})]
    results = {"reference_capacity_qps": cap, "qps": qps, "start_iteration": int(it[start]),
               "budget_histogram": hist, "median_slack_ms_small_budget": slack_small,
               "median_slack_ms_large_budget": slack_large}
    return Report("\n".join(body), {"chunks": rows, "chunk_histogram": hist}, [fig], results)


def _plot(rows, p: Params, qps: float, path: Path) -> Path:
    plt = pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    x = [r["iteration"] for r in rows]
    a.step(x, [r["token_budget"] if r["prefill_waiting"] else np.nan for r in rows], where="mid", color="tab:blue",
           label="token budget T chosen (when a prefill ran)")
    a.plot(x, [r["prefill_tokens"] + r["decodes"] for r in rows], ".", ms=3, color="tab:orange",
           label="tokens run (prefill + decodes)")
    a.set_ylabel("tokens")
    a.set_yscale("log", base=2)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    a.set_title(f"{p.policy} on {p.trace} at {qps:g} QPS: chunk size per iteration", fontsize=10)
    b.plot(x, [r["min_slack_ms"] if r["min_slack_ms"] is not None else np.nan for r in rows], color="tab:green",
           label="min slack of running decodes")
    b.plot(x, [r["batch_ms"] for r in rows], color="tab:red", lw=0.8, label="batch time")
    b.set_yscale("symlog", linthresh=10)
    b.set_ylabel("ms (log above 10)")
    b.set_xlabel("iteration")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
