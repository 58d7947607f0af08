"""`niyama capacity`: per-replica goodput of several policies on several traces (paper Fig. 7)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ..metrics.throughput_bound import MAX_NUM_SEQS, trace_bound
from ..metrics.paper import FIG7_GOODPUT
from ..sim.capacity_study import CapacityJob, run_capacity_jobs
from ..sim.scenario import Scenario
from .common import (add_output_options, add_replica_options, add_traces_option, add_workload_options, check_policy,
                     scenario_from_args, trace_names)

EXAMPLES = """examples:
  niyama capacity                                   # all shipped traces x fcfs, edf, niyama (~3 min on 2 cores)
  niyama capacity --trace sharegpt --policies fcfs,edf,niyama --requests 18000
  niyama capacity --trace azure-code --policies edf,edf-dc,niyama-alpha0,niyama --no-sustainable
"""


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="find each policy's goodput (QPS at <= 1%% violations) per trace",
                       description="Search the highest load at which the worst tier has <= 1% violations "
                                   "(coarse-to-fine, then linear interpolation), per trace x policy; print a "
                                   "table and write CSV/JSON and a bar chart like the paper's Fig. 7.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_traces_option(p)
    p.add_argument("--policies", default="fcfs,edf,niyama", help="comma-separated policies (default fcfs,edf,niyama)")
    p.add_argument("--requests", type=int, default=None,
                   help="fixed requests per run (default: arrivals span --duration-h at every load)")
    p.add_argument("--duration-h", type=float, default=4.0, help="hours of arrivals per run (default 4)")
    p.add_argument("--target", type=float, default=1.0, help="violation %% allowed in the worst tier (default 1)")
    p.add_argument("--no-sustainable", action="store_true",
                   help="skip the sustainable capacity (runs twice as long, backlog under the shortest TTLT)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
    add_workload_options(p)
    add_replica_options(p)
    add_output_options(p, "results/capacity", "capacity.csv/json, points.csv and the PNG")
    p.set_defaults(run=run)


MIN_REQUESTS = 300     # the 1% rule needs ~100 requests per tier before one late request is not already 1%


def run(args) -> int:
    if args.requests is not None and args.requests < MIN_REQUESTS:
        raise ValueError(f"--requests {args.requests} is too few for a capacity search: with 3 tiers one late "
                         f"request is already over the 1% rule; use at least {MIN_REQUESTS}, or --duration-h")
    traces = trace_names(args)
    policies = [check_policy(x) for x in args.policies.split(",") if x]
    jobs = [CapacityJob(scenario_from_args(args, trace, pol), target_pct=args.target,
                        sustainable=not args.no_sustainable)
            for trace in traces for pol in policies]
    results = run_capacity_jobs(jobs, args.jobs, show_progress=not args.quiet)
    from ..metrics.plots import goodput_bars   # matplotlib is slow to import; only needed here

    rows = with_bounds([r.to_dict() for r in results], [r.job.scenario for r in results])
    print(format_table(rows))
    print(legend(args.target))
    for line in short_run_warnings(results):
        print(line, file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, out)
    png = goodput_bars(rows, out / "capacity.png",
                       title=f"Per-replica goodput, {args.profile} (worst tier <= {args.target:g}% violations)")
    print(f"\nwrote {out / 'capacity.csv'}, {out / 'points.csv'}, {out / 'capacity.json'} and {png}")
    return 0


def short_run_warnings(results) -> list[str]:
    """Runs whose arrivals span less than the longest deadline: batch requests then finish after the last
    arrival, where nothing competes with them, so the capacity found is optimistic."""
    out = []
    for r in results:
        passed = [p for p in r.points if p.passed]
        if not passed:
            continue
        best = max(passed, key=lambda p: p.qps)        # the run nearest the capacity that passed
        d = best.detail
        if d["span_s"] < d["longest_deadline_s"]:
            out.append(f"warning: {r.job.label}: at {best.qps:g} QPS the run's arrivals span {d['span_s']:.0f} s, "
                       f"less than the longest deadline ({d['longest_deadline_s']:.0f} s): its capacity is "
                       f"optimistic; use more --requests or --duration-h (default 4 h)")
    return out


def with_bounds(rows: list[dict], scenarios: list[Scenario]) -> list[dict]:
    """Each row with its trace's throughput bound (`niyama bound`) under the replica's real batch times and the
    policy's max_num_seqs, and the capacities as % of it. One bound per distinct (trace, profile, ...)."""
    bounds = {}
    for row, sc in zip(rows, scenarios):
        key = (sc.trace, sc.executor_profile or sc.profile, sc.policy_options.get("max_num_seqs", MAX_NUM_SEQS),
               sc.seed, sc.workload_options.get("output_tokens"), sc.kv_tokens if sc.prefix_caching else None)
        if key not in bounds:
            bounds[key] = trace_bound(*key[:3], seed=key[3], output_tokens=key[4], kv_tokens=key[5]).qps
        row["bound_qps"] = bounds[key]
        row["capacity_pct_of_bound"] = 100 * row["capacity_qps"] / bounds[key]
        row["sustainable_pct_of_bound"] = (None if row["sustainable_qps"] is None
                                           else 100 * row["sustainable_qps"] / bounds[key])
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'trace':<12} {'policy':<22} {'goodput QPS':>11} {'sustainable':>11} {'paper Fig.7':>11} "
             f"{'bound':>6} {'% of bound':>10} {'runs':>5} {'time':>6}"]
    for r in rows:
        ref = FIG7_GOODPUT.get(r["trace"], {}).get(r["policy"])
        sus = "-" if r["sustainable_qps"] is None else f"{r['sustainable_qps']:.2f}"
        pct = f"{r['capacity_pct_of_bound']:.0f}%"
        if r["sustainable_pct_of_bound"] is not None:
            pct += f"/{r['sustainable_pct_of_bound']:.0f}%"
        lines.append(f"{r['trace']:<12} {r['policy']:<22} {r['capacity_qps']:>11.2f} {sus:>11} "
                     f"{'-' if ref is None else f'{ref:.1f}':>11} {r['bound_qps']:>6.2f} {pct:>10} "
                     f"{len(r['points']) + len(r['long_points']):>5} {r['seconds']:>5.0f}s")
    return "\n".join(lines)


def legend(target_pct: float) -> str:
    """What the columns mean, under the table: the bound ones especially are not self-explanatory."""
    return (f"goodput QPS: the highest load whose worst tier has <= {target_pct:g}% violations; sustainable: the "
            "same on runs twice as long whose backlog stays under the shortest TTLT; paper Fig.7: the paper's "
            "number.\nbound: the QPS one replica could finish at best on the trace, running only full 2552-token "
            "steps in the trace's prefill/decode mix, from the batch-time profile alone, no deadlines (`niyama "
            "bound`); % of bound: goodput / bound, and sustainable / bound after the slash; runs, time: the search's "
            "simulations and seconds.")


def write_tables(rows: list[dict], out: Path) -> None:
    (out / "capacity.json").write_text(json.dumps(rows, indent=1))
    with (out / "capacity.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trace", "policy", "capacity_qps", "sustainable_qps", "paper_fig7_qps", "bound_qps",
                    "capacity_pct_of_bound", "sustainable_pct_of_bound"])
        for r in rows:
            w.writerow([r["trace"], r["policy"], f"{r['capacity_qps']:.4f}",
                        "" if r["sustainable_qps"] is None else f"{r['sustainable_qps']:.4f}",
                        FIG7_GOODPUT.get(r["trace"], {}).get(r["policy"], ""), f"{r['bound_qps']:.4f}",
                        f"{r['capacity_pct_of_bound']:.2f}",
                        "" if r["sustainable_pct_of_bound"] is None else f"{r['sustainable_pct_of_bound']:.2f}"])
    with (out / "points.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trace", "policy", "run_length", "qps", "worst_tier_violation_pct", "passed", "backlog_s",
                    "requests", "relegated"])
        for r in rows:
            for kind, pts in (("1x", r["points"]), ("2x", r["long_points"])):
                for p in pts:
                    w.writerow([r["trace"], r["policy"], kind, p["qps"], f"{p['violation_pct']:.3f}", p["passed"],
                                f"{p['backlog_s']:.1f}", p["detail"]["requests"], p["detail"]["relegated"]])
