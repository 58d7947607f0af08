"""`niyama experiment NAME`: one experiment of the paper's evaluation, run on the simulator."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from ..experiments import EXPERIMENTS, Context, run_experiment
from .common import add_output_options, add_replica_options, parse_any_policy_options

EXAMPLES = """examples:
  niyama experiment list                              # experiments and their parameters
  niyama experiment load-sweep                        # Figs. 10/11, full size (4-hour runs)
  niyama experiment overload --quick                  # small and fast (what CI runs)
  niyama experiment alpha --set loads=1.0 --set alphas_ms=0,4,8
  niyama experiment ablation --opt safety_factor=1.5  # change a policy knob everywhere it exists
  niyama experiment all --quick --out /tmp/exp
"""


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's experiments (CSV + PNG + summary.md)",
                       description="Regenerate an experiment of the paper's evaluation on the simulator. Each writes "
                                   "its tables as CSV, its picture as PNG, results.json and a summary.md that puts "
                                   "our numbers beside the paper's, into OUT/NAME/.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}; 'all'; or 'list'")
    p.add_argument("--quick", action="store_true", help="small runs (minutes in total), for CI and a first look")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="change an experiment parameter (see `niyama experiment list`); lists are comma-separated")
    p.add_argument("--reference-qps", type=float, default=None,
                   help="niyama's capacity that load levels are scaled to (default: searched once, then cached)")
    p.add_argument("--seed", type=int, default=0, help="seed for arrivals, lengths, tiers, noise (default 0)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
    add_replica_options(p)    # --opt applies to every policy of the experiment that has the knob
    add_output_options(p, "results/experiments", "the results, one folder per experiment (OUT/NAME/)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.name == "list":
        print(describe())
        return 0
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}, all, list")
    for name in names:   # check --set before anything runs
        _params_for(name, args, strict=len(names) == 1)
    if len(names) > 1:
        known = {k for n in names for k in _fields(n)}
        unknown = [item for item in args.params if item.partition("=")[0].strip() not in known]
        if unknown:
            raise ValueError(f"--set {unknown[0]!r}: no experiment has that parameter")
    ctx = Context(Path(args.out), quick=args.quick, seed=args.seed, profile=args.profile, kv_tokens=args.kv_tokens,
                  prefix_caching=args.prefix_caching, noise=args.noise, executor_profile=args.executor_profile, online_correction=args.online_correction,
                  policy_overrides=parse_any_policy_options(args.opt),
                  reference_qps=args.reference_qps, processes=args.jobs, show_progress=not args.quiet)
    command = "niyama " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    for name in names:
        exp = EXPERIMENTS[name]
        print(f"\n== {exp.title}: niyama experiment {name}{' --quick' if args.quick else ''}", flush=True)
        report = run_experiment(exp, ctx, _params_for(name, args, strict=len(names) == 1), command)
        print(report.body)
        print(f"\nwrote {ctx.root / name}/: summary.md, results.json, "
              + ", ".join([f"{s}.csv" for s in report.tables] + [f.name for f in report.figures]), flush=True)
    return 0


def _fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(EXPERIMENTS[name].params)}


def _params_for(name: str, args, strict: bool) -> list[str]:
    """The --set items this experiment has (all of them must be known when one experiment runs)."""
    items = [item for item in args.params if strict or item.partition("=")[0].strip() in _fields(name)]
    EXPERIMENTS[name].make_params(args.quick, items)   # raises on an unknown key or a bad value
    return items


def describe() -> str:
    lines = []
    for name, exp in EXPERIMENTS.items():
        lines.append(f"{name}: {exp.title}")
        for f in dataclasses.fields(exp.params):
            default = exp.params().__dict__[f.name]
            quick = f"   (--quick: {show(exp.quick[f.name])})" if f.name in exp.quick else ""
            lines.append(f"    {f.name} = {show(default)}{quick}")
    return "\n".join(lines)


def show(value) -> str:
    """A parameter as a person reads it: floats to 4 significant digits (2/3.8 shows as 0.5263)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)
