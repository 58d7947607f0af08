"""`niyama simulate`: one workload, one policy, one simulated replica."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..metrics import format_report, summarize, write_records_csv
from ..sim import simulate
from ..workload import make_workload
from .common import add_output_options, add_replica_options, add_workload_options, check_policy, parse_policy_options, trace_help

EXAMPLES = """examples:
  niyama simulate --trace azure-code --policy niyama --qps 3.5 --requests 20000
  niyama simulate --trace sharegpt --policy edf --qps 1.8 --opt chunk_size=512
  niyama simulate --trace azure-conv --arrival diurnal --diurnal-qps 2,5 --low-priority 0.2
  niyama simulate --trace azure-code --qps 6 --on-infeasible Q1=reject   # admission control for Q1
"""


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate one workload under one policy and report per-tier latency",
                       description="Simulate one replica serving a workload; print a per-tier report and write "
                                   "per-request records.", epilog=EXAMPLES,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="azure-code", help=trace_help() + " (default azure-code)")
    p.add_argument("--policy", default="niyama", help="scheduling policy, see `niyama policies` (default niyama)")
    p.add_argument("--qps", type=float, default=None, help="mean arrival rate (Poisson; required unless --arrival "
                                                          "trace or diurnal)")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default: 4 hours of arrivals)")
    p.add_argument("--duration-h", type=float, default=None, help="arrivals span this many hours (default 4)")
    p.add_argument("--arrival", choices=("poisson", "trace", "diurnal"), default="poisson",
                   help="arrival process (default poisson, gaps capped at 8/QPS)")
    p.add_argument("--diurnal-qps", default=None, metavar="LOW,HIGH", help="diurnal levels, e.g. 2,5")
    p.add_argument("--diurnal-period-min", type=float, default=15.0, help="minutes per diurnal level (default 15)")
    add_workload_options(p)
    add_replica_options(p)
    add_output_options(p, "results/simulate", "records.csv and summary.json")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    check_policy(args.policy)
    options = parse_policy_options(args.policy, args.opt)
    diurnal = tuple(float(x) for x in args.diurnal_qps.split(",")) if args.diurnal_qps else None
    if diurnal is not None and len(diurnal) != 2:
        raise ValueError("--diurnal-qps takes LOW,HIGH")
    wl = make_workload(args.trace, args.qps, num_requests=args.requests,
                       duration_s=args.duration_h * 3600 if args.duration_h else None, seed=args.seed,
                       arrival=args.arrival, tiers=args.tiers, tier_mix=args.tier_mix,
                       low_priority_fraction=args.low_priority, diurnal_qps=diurnal,
                       diurnal_period_s=args.diurnal_period_min * 60, on_infeasible=args.on_infeasible)
    with tqdm(total=len(wl), unit="req", desc=f"{wl.name}/{args.policy}", disable=args.quiet,
              dynamic_ncols=True) as bar:
        step = max(1, len(wl) // 200)

        def progress(done: int) -> None:
            if done - bar.n >= step or done == len(wl):
                bar.update(done - bar.n)

        result = simulate(wl, args.policy, profile=args.profile, kv_tokens=args.kv_tokens,
                          prefix_caching=args.prefix_caching, noise=args.noise,
                          seed=args.seed, policy_options=options, progress=progress,
                          executor_profile=args.executor_profile, online_correction=args.online_correction)
    summary, records = summarize(result)
    print(format_report(summary))
    out = Path(args.out)
    write_records_csv(records, out / "records.csv")
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    print(f"\nwrote {out / 'records.csv'} and {out / 'summary.json'}")
    return 0
