"""What the interactive tier's TBT costs a replica's throughput, and which policy knobs move it.

At a load near capacity, one hour of arrivals is simulated under niyama; the same workload is then run with
each policy variant, and once more with the interactive tier's TBT loosened to the batch pace (0.4 s). Since
the work is the same in every run, the replica's busy time is its cost: fewer busy seconds = more throughput.
For every run it prints the number of steps, busy time, requests served per busy second (the service rate),
the backlog after the last arrival, the share of steps at each budget, and, with a two-regime linear profile,
the share of busy time that is the steps' fixed cost (intercepts). For niyama it also shows how much of each
interactive request's banked slack (an early first token) its decodes spent, by output length.

    python benchmarks/pace_cost.py                                  # the three shipped traces, a100-llama3-8b
    python benchmarks/pace_cost.py --point sharegpt:2.05 --profile h100-llama3-8b --tag h100

Saves benchmarks/results/pace_cost_<tag>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.kv import BlockAllocator  # noqa: E402
from niyama.predictor import load_profile  # noqa: E402
from niyama.qos import load_tiers  # noqa: E402
from niyama.replica import Replica  # noqa: E402
from niyama.scheduler import make_scheduler  # noqa: E402
from niyama.scheduler.niyama import CHUNK_CANDIDATES  # noqa: E402
from niyama.sim.executor import SimulatedExecutor  # noqa: E402
from niyama.sim.run import DEFAULT_KV_TOKENS  # noqa: E402
from niyama.workload import load_trace, make_workload  # noqa: E402

LOOSE_TBT_S = 0.4                                   # the batch tiers' pace
FINE = tuple(range(32, CHUNK_CANDIDATES[-1], 32)) + (CHUNK_CANDIDATES[-1],)
VARIANTS = {                                        # label -> niyama knobs
    "niyama": {},
    "safety 1.0": {"safety_factor": 1.0},
    "budgets every 32 tokens, safety 1.0": {"chunk_candidates": FINE, "safety_factor": 1.0},
    "alpha / 4": {"alpha_s": 0.002},
    "alpha x 4": {"alpha_s": 0.032},
    "paper's rule when late": {"late_recovery": False},
}
DEFAULT_POINTS = ("azure-code:4.3", "azure-conv:5.4", "sharegpt:2.05")   # near niyama's capacity on the A100


def loose_tiers(trace: str):
    """The trace's tiers with every interactive TBT set to the batch pace."""
    from dataclasses import replace
    return tuple(replace(t, tbt_s=LOOSE_TBT_S) if t.interactive else t for t in load_tiers(load_trace(trace).tiers))


def run(trace: str, qps: float, profile: str, hours: float, options: dict, tiers=None) -> dict:
    pred = load_profile(profile)
    scheduler = make_scheduler("niyama", pred, **options)
    kv = BlockAllocator.for_tokens(DEFAULT_KV_TOKENS)
    replica = Replica(scheduler, SimulatedExecutor(pred), kv)
    regimes = hasattr(pred, "small") and hasattr(pred, "split")
    stats = collections.Counter()
    budgets = collections.Counter()

    def on_step(plan, result, end):
        stats["steps"] += 1
        stats["busy_s"] += result.duration_s
        budgets[plan.token_budget if plan.prefills else "decode-only"] += 1
        if regimes:
            stats["fixed_s"] += (pred.small if plan.num_tokens <= pred.split else pred.large).intercept

    replica.on_step.append(on_step)
    wl = make_workload(trace, qps, duration_s=hours * 3600, seed=0, tiers=tiers)
    requests = wl.requests()
    for req in requests:
        replica.add(req)
    replica.run()
    busy = stats["busy_s"]
    out = {"steps": stats["steps"], "busy_s": busy, "requests": len(requests),
           "service_rate_qps": len(requests) / busy,
           "backlog_s": max(r.finish_s for r in requests) - wl.last_arrival_s,
           "budgets": {str(k): v / stats["steps"] for k, v in budgets.most_common(6)}}
    if regimes:
        out["fixed_cost_share"] = stats["fixed_s"] / busy
    if tiers is None:
        out["slack_spent"] = slack_spent(requests)
    return out


def slack_spent(requests) -> dict:
    """Interactive requests: slack banked by an early first token, and what their decodes left unspent at the
    end, by output length."""
    rows = [(r.max_output_tokens, r.anchor_s - r.first_token_s,
             r.anchor_s + (r.max_output_tokens - 1) * r.tbt_s - r.finish_s)
            for r in requests if r.tier.interactive and r.max_output_tokens > 1]
    out = {}
    for lo, hi in ((2, 50), (50, 200), (200, 500), (500, 10 ** 9)):
        sel = [(b, left) for n, b, left in rows if lo <= n < hi]
        if sel:
            banked, left = np.array(sel).T
            out[f"{lo}-{hi if hi < 10 ** 9 else ''}"] = {"share": len(sel) / len(rows), "banked_s": banked.mean(),
                                                         "left_s": left.mean()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", action="append", default=None, metavar="TRACE:QPS",
                    help=f"trace and load (default: {' '.join(DEFAULT_POINTS)})")
    ap.add_argument("--profile", default="a100-llama3-8b")
    ap.add_argument("--hours", type=float, default=1.0, help="hours of arrivals per run (default 1)")
    ap.add_argument("--tag", default="a100")
    args = ap.parse_args()
    results = []
    for point in args.point or DEFAULT_POINTS:
        trace, _, qps = point.partition(":")
        runs = {}
        for label, options in VARIANTS.items():
            t0 = time.perf_counter()
            runs[label] = run(trace, float(qps), args.profile, args.hours, options)
            print(f"  {trace} {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        runs[f"interactive TBT {LOOSE_TBT_S:g} s"] = run(trace, float(qps), args.profile, args.hours, {},
                                                          loose_tiers(trace))
        results.append({"trace": trace, "qps": float(qps), "profile": args.profile, "hours": args.hours,
                        "runs": runs})
        print(format_point(results[-1]))
    path = HERE / "results" / f"pace_cost_{args.tag}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


def format_point(point: dict) -> str:
    lines = [f"\n{point['trace']} at {point['qps']:g} QPS, {point['hours']:g} h, {point['profile']}",
             f"{'run':<38} {'steps':>7} {'busy s':>7} {'served/busy s':>13} {'backlog s':>9} {'fixed cost':>10}  "
             "budgets (share of steps)"]
    for label, r in point["runs"].items():
        fixed = f"{r['fixed_cost_share']:.1%}" if "fixed_cost_share" in r else "-"
        budgets = ", ".join(f"{k}: {v:.0%}" for k, v in list(r["budgets"].items())[:4])
        lines.append(f"{label:<38} {r['steps']:>7} {r['busy_s']:>7.0f} {r['service_rate_qps']:>13.3f} "
                     f"{r['backlog_s']:>9.0f} {fixed:>10}  {budgets}")
    spent = point["runs"]["niyama"].get("slack_spent", {})
    if spent:
        lines.append("niyama, interactive requests by output tokens: banked slack -> left unspent at the end")
        lines += [f"  {k:>9}: {v['share']:.1%} of them, {v['banked_s']:.2f} s -> {v['left_s']:.2f} s"
                  for k, v in spent.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
