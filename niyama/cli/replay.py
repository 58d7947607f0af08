"""`niyama replay`: a trace workload on the real engine, reported like `niyama simulate`."""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

from ..metrics import format_report, summarize, write_records_csv
from ..workload import make_workload
from .common import (add_engine_options, add_output_options, add_profile_option, add_workload_options, check_policy,
                     engine_config_from_args, parse_policy_options, trace_help)

EXAMPLES = """examples:
  niyama replay --trace sharegpt --qps 0.5 --requests 40
  niyama replay --trace azure-code --qps 0.2 --requests 20 --policy edf
  niyama replay --trace azure-conv --qps 2 --requests 50 --max-prompt-tokens 256 --max-output-tokens 32
  niyama replay --trace azure-conv --qps 1 --requests 30 --profile results/replay/profile.json
  niyama replay --model llama-3-8b --load-format dummy --device cuda --trace azure-code --qps 3 --requests 500
  niyama replay --model llama-3-8b --load-format dummy --device cuda --trace azure-conv --qps 20 --requests 1200 \\
      --sampling chat

Prompts are random token ids of the trace's lengths; each request generates
exactly its trace output length, greedy unless --sampling says otherwise. The measured steps are saved (steps.csv) and
fitted into a batch-time profile of this machine (profile.json), which
--profile can give to the next replay so the scheduler plans with real times.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="replay a trace workload on the real engine and report per-tier latency",
                       description="Replay a workload on the model engine in real time; print the same per-tier "
                                   "report as `niyama simulate`.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="sharegpt", help=trace_help() + " (default sharegpt)")
    p.add_argument("--policy", default="niyama", help="scheduling policy, see `niyama policies` (default niyama)")
    p.add_argument("--qps", type=float, required=True, help="mean arrival rate (Poisson)")
    p.add_argument("--requests", type=int, default=40, help="number of requests (default 40)")
    add_profile_option(p)
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="clip prompts to N tokens (default: only to the model context and KV cache)")
    p.add_argument("--max-output-tokens", type=int, default=None, metavar="N", help="clip outputs to N tokens")
    p.add_argument("--sampling", default="greedy", metavar="MIX",
                   help="how requests draw their tokens: greedy, chat (temperature 0.7, top_p 0.9, what chat clients "
                        "send), top-k (0.7, top_k 50), chat-penalized (chat + repetition_penalty 1.1), serving (a mix "
                        "of those), or a JSON mix file; each request gets its own seed (default greedy)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="override a policy knob")
    add_workload_options(p)
    add_engine_options(p)
    add_output_options(p, "results/replay", "records.csv, summary.json, steps.csv and profile.json")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..engine import LLMEngine
    from ..engine.trace_replay import STEP_COLUMNS, replay
    from ..engine.sampling import SamplingMix
    from ..predictor.fit import fit_two_regime, relative_errors

    check_policy(args.policy)
    options = parse_policy_options(args.policy, args.opt)
    if args.requests < 1:
        raise ValueError("--requests must be >= 1")
    sampling = SamplingMix.parse(args.sampling)
    wl = make_workload(args.trace, args.qps, num_requests=args.requests, seed=args.seed, tiers=args.tiers,
                       tier_mix=args.tier_mix, low_priority_fraction=args.low_priority,
                       on_infeasible=args.on_infeasible)
    engine = LLMEngine(engine_config_from_args(args, policy=args.policy, policy_options=options,
                                               profile=args.profile))
    print(engine.describe())
    with tqdm(total=len(wl), unit="req", desc=f"replay {wl.name}/{args.policy}", disable=args.quiet,
              dynamic_ncols=True) as bar:
        out = replay(engine, wl, seed=args.seed, progress=lambda left: bar.update(len(wl) - left - bar.n),
                     max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                     sampling=sampling)
    if out.num_clipped:
        print(f"note: {out.num_clipped} of {len(wl)} requests had their lengths clipped (model context, KV cache "
              f"or --max-*-tokens)")
    summary, records = summarize(out.result)
    print(format_report(summary))
    steps = out.steps
    busy = sum(s[4] for s in steps)
    tokens = sum(s[0] + s[1] for s in steps)
    print(f"\nengine: {len(steps)} steps, {busy:.1f} s busy, {tokens / busy:.0f} tokens/s through the model, "
          f"mean step {1000 * busy / len(steps):.1f} ms")
    dest = Path(args.out)
    write_records_csv(records, dest / "records.csv")
    (dest / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    with open(dest / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEP_COLUMNS)
        w.writerows(steps)
    written = ["records.csv", "summary.json", "steps.csv"]
    try:
        profile = fit_two_regime(steps, name=f"measured-{engine.model_name}-{engine.device.type}")
    except ValueError as e:
        print(f"no profile fitted: {e}")
    else:
        err = relative_errors(profile, steps)
        (dest / "profile.json").write_text(json.dumps(profile.to_dict(), indent=1))
        written.append("profile.json")
        print(f"fitted a batch-time profile of this machine: median error {100 * float(sorted(err)[len(err) // 2]):.1f}%"
              f" over {len(steps)} steps")
    print(f"wrote {', '.join(str(dest / w) for w in written)}")
    return 0
