"""`niyama plan`: how many replicas a load needs, one shared pool against silos per tier."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ..cluster import ROUTERS
from ..cluster.fleet import SILO_POLICY
from ..cluster.planner import Plan, PlanSetup, plan_fleet
from .common import (add_output_options, add_replica_options, add_workload_options, check_policy,
                     parse_policy_options, trace_help)

DEFAULT_ROUTER = "qos"
EXAMPLES = """examples:
  niyama plan --trace azure-code --qps 43                  # the paper's Table 4 load, scaled to our trace
  niyama plan --trace azure-conv --qps 20 --tier-mix 70,15,15 --router round-robin
  niyama plan --trace azure-code --qps 43 --duration-h 4   # 4-hour runs: slower, Q2/Q3 backlogs show
"""


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="replicas needed for a load: the smallest shared pool vs the best silo split",
                       description="Search the fewest replicas that serve --qps of a trace with the worst tier at "
                                   "<= --target % violations: one shared pool (every replica serves every tier, "
                                   "--policy behind --router) and silos (a pool per tier, Sarathi chunks: 256 for "
                                   "interactive tiers, 2048 for batch tiers, round-robin inside). Prints a table, "
                                   "writes plan.json, plan.csv (every run) and plan.png.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="azure-code", help=trace_help() + " (default azure-code)")
    p.add_argument("--qps", type=float, required=True, help="the whole fleet's load (Poisson arrivals)")
    p.add_argument("--duration-h", type=float, default=0.5,
                   help="hours of arrivals per run (default 0.5: quick; runs shorter than the longest TTLT, "
                        "1800 s, are optimistic for batch tiers, and the command warns)")
    p.add_argument("--target", type=float, default=1.0, help="violation %% allowed in the worst tier (default 1)")
    p.add_argument("--policy", default="niyama", help="the shared pool's policy (default niyama)")
    p.add_argument("--router", default=DEFAULT_ROUTER, choices=tuple(ROUTERS),
                   help=f"the shared pool's router (default {DEFAULT_ROUTER}; round-robin is also searched, "
                        "cheaply, as the start)")
    p.add_argument("--silo-policy", default=SILO_POLICY, help=f"the silos' policy (default {SILO_POLICY})")
    p.add_argument("--sample-replicas", type=int, default=2,
                   help="round-robin pools: replicas simulated per run (each serves every n-th request exactly "
                        "as in the whole pool; 0 = all; default 2)")
    p.add_argument("--max-replicas", type=int, default=512, help="give up above this many per pool (default 512)")
    p.add_argument("--no-bound-floor", action="store_true",
                   help="also try pools whose replicas each get more load than one replica's throughput bound "
                        "(`niyama bound`): a finite run can pass them though their backlog grows for as long as "
                        "the load lasts (default: never fewer replicas than the load over that bound, rounded up)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
    add_workload_options(p)
    add_replica_options(p)
    add_output_options(p, "results/plan", "plan.json, plan.csv and plan.png")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.qps <= 0 or args.duration_h <= 0:
        raise ValueError("--qps and --duration-h must be > 0")
    if args.online_correction or args.executor_profile:
        raise ValueError("niyama plan simulates replicas whose batches take what --profile says; "
                         "--executor-profile and --online-correction are not supported here")
    for name in (args.policy, args.silo_policy):
        check_policy(name)
    setup = PlanSetup(args.trace, args.qps, duration_s=args.duration_h * 3600, seed=args.seed, profile=args.profile,
                      kv_tokens=args.kv_tokens, prefix_caching=args.prefix_caching, noise=args.noise,
                      workload_options=dict(tiers=args.tiers, tier_mix=args.tier_mix,
                                            low_priority_fraction=args.low_priority,
                                            on_infeasible=args.on_infeasible),
                      target_pct=args.target, policy=args.policy, router=args.router,
                      policy_options=parse_policy_options(args.policy, args.opt), silo_policy=args.silo_policy,
                      sample_replicas=args.sample_replicas, max_replicas=args.max_replicas,
                      bound_floor=not args.no_bound_floor)
    plan = plan_fleet(setup, processes=args.jobs, show_progress=not args.quiet)
    print(format_plan(plan))
    if args.duration_h * 3600 < 1800:
        print(f"warning: arrivals span {args.duration_h * 60:.0f} min, less than the longest TTLT (30 min): batch "
              "tiers' backlogs have no time to grow, so the counts may be optimistic; --duration-h 4 checks",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    write_runs_csv(plan, out / "plan.csv")
    from ..cluster.planner_plots import plan_chart   # matplotlib is slow to import

    png = plan_chart(plan, out / "plan.png")
    print(f"\nwrote {out / 'plan.json'}, {out / 'plan.csv'} and {png}")
    return 0


def answer_rows(plan: Plan) -> list[dict]:
    """One row per answer: the shared pool (its router, and round-robin's), the silo split."""
    rows = []
    for search in [plan.shared] + ([plan.shared_rr] if plan.shared_rr else []):
        e = _at(search, search.answer)
        rows.append({"fleet": f"shared ({search.router})", "spec": f"shared:{search.answer}" if search.answer else "-",
                     "replicas": search.answer, **_tiers(plan, e.tier_violation_pct if e else {}),
                     "runs": len(search.points)})
    counts = plan.silo_counts
    silo_pct = {}
    for s in plan.silos:
        e = _at(s, s.answer)
        silo_pct.update(e.tier_violation_pct if e else {})
    rows.append({"fleet": "silo", "spec": f"silo:{','.join(map(str, counts))}" if counts else "-",
                 "replicas": plan.silo_total, **_tiers(plan, silo_pct), "runs": sum(len(s.points) for s in plan.silos)})
    return rows


def _at(search, n):
    return next((p for p in search.points if p.num_replicas == n), None)


def _tiers(plan: Plan, pct: dict) -> dict:
    return {f"{t}_violation_pct": pct.get(t) for t in plan.tiers}


def format_plan(plan: Plan) -> str:
    s = plan.setup
    lines = [f"{s.trace} at {s.qps:g} QPS, {s.duration_s / 3600:g} h of arrivals, worst tier <= {s.target_pct:g}% "
             f"violated; shared: {s.policy}; silos: {s.silo_policy}, chunk 256 (interactive) / 2048 (batch), "
             "round-robin inside", ""]
    head = f"{'fleet':<22} {'spec':<14} {'replicas':>8} " + " ".join(f"{t + ' %':>7}" for t in plan.tiers) + \
        f" {'runs':>5}"
    lines.append(head)
    for r in answer_rows(plan):
        pct = " ".join("      -" if r[f"{t}_violation_pct"] is None else f"{r[f'{t}_violation_pct']:>7.2f}"
                       for t in plan.tiers)
        lines.append(f"{r['fleet']:<22} {r['spec']:<14} {r['replicas'] if r['replicas'] is not None else '-':>8} "
                     f"{pct} {r['runs']:>5}")
    lines.append("")
    if plan.saving is not None:
        lines.append(f"the shared pool needs {plan.shared.answer} replicas against {plan.silo_total} in silos: "
                     f"{100 * plan.saving:.0f}% fewer ({plan.shared.answer / plan.silo_total:.2f}x)")
    else:
        lines.append(f"no answer within --max-replicas {s.max_replicas} for one of them")
    busy = ", ".join(f"{x.pool} {x.bound:.2f}" for x in [plan.shared] + plan.silos if x.points)
    lines.append(f"replicas kept busy at their throughput bound: {busy}"
                 + ("; no pool was searched below that, rounded up" if s.bound_floor else ""))
    sampled = "all replicas" if not s.sample_replicas else f"{s.sample_replicas} sampled replicas per pool"
    lines.append(f"round-robin pools: {sampled}; {plan.shared.router} pool: whole fleet. "
                 f"{sum(len(x.points) for x in plan.searches)} runs in {plan.seconds:.0f} s")
    return "\n".join(lines)


def write_runs_csv(plan: Plan, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["search", "router", "replicas", *(f"{t}_violation_pct" for t in plan.tiers), "worst_pct",
                    "passed", "requests", "simulated_replicas", "backlog_s", "seconds"])
        for search in plan.searches:
            for p in search.points:
                w.writerow([search.pool, p.router, p.num_replicas,
                            *(f"{p.tier_violation_pct[t]:.3f}" if t in p.tier_violation_pct else ""
                              for t in plan.tiers),
                            f"{p.worst_pct:.3f}", p.passed, p.num_requests, p.simulated_replicas,
                            f"{p.backlog_s:.1f}", f"{p.seconds:.2f}"])
