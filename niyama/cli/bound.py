"""`niyama bound`: the most QPS one replica could serve on a trace, from its batch-time profile alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..metrics.throughput_bound import BUDGET, MAX_NUM_SEQS, NUM_REQUESTS, ThroughputBound, trace_bound
from ..sim.run import DEFAULT_KV_TOKENS
from .common import add_prefix_caching_option, add_seed_option, add_sim_profile_option, add_traces_option, trace_names

EXAMPLES = """examples:
  niyama bound                                          # every shipped trace on a100-llama3-8b (~2 s)
  niyama bound --trace sharegpt --profile h100-llama3-8b
  niyama bound --trace azure-conv --max-num-seqs 128 --json results/bound.json
  niyama bound --trace sharegpt --max-num-seqs 163      # decodes held to what 440K KV tokens fit

bound: only steps of 2552 tokens in the trace's prefill/decode mix. absolute: the cheapest steps the
profile allows (any size, prefill and decode apart, or two shapes time-shared). paced: the best step that
takes no longer than the tightest interactive tier's TBT. docs/bound.md defines them.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bound", help="throughput bound per trace under a batch-time profile (no simulation)",
                       description="The requests per second one replica could finish at best on each trace, "
                                   "from the batch-time profile and the trace's mean prompt and output lengths: "
                                   "the 2552-token-step bound and the absolute bound, with the step shapes "
                                   "behind them.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_traces_option(p)
    p.add_argument("--requests", type=int, default=NUM_REQUESTS,
                   help=f"requests drawn from each trace for the mean lengths (default {NUM_REQUESTS})")
    p.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS,
                   help=f"most decodes one step may hold (default {MAX_NUM_SEQS}, the schedulers')")
    p.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS,
                   help=f"the replica's KV cache, whose prefix cache serves at most what a cache of this size could "
                        f"(default {DEFAULT_KV_TOKENS})")
    add_prefix_caching_option(p, "where the trace says which prefixes are equal (mooncake): the bound counts "
                                 "only the prefill the cache leaves")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the bounds, with every step shape, as JSON")
    add_sim_profile_option(p)
    add_seed_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    kv = args.kv_tokens if args.prefix_caching else None
    bounds = [trace_bound(t, args.profile, args.max_num_seqs, args.requests, args.seed, kv_tokens=kv)
              for t in trace_names(args)]
    print(f"profile {args.profile}, steps of at most {BUDGET} tokens and {args.max_num_seqs} decodes, "
          f"{args.requests} requests per trace (seed {args.seed})")
    print(format_table(bounds))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([b.to_dict() for b in bounds], indent=1))
        print(f"\nwrote {path}")
    return 0


def format_table(bounds: list[ThroughputBound]) -> str:
    lines = [f"{'trace':<12} {'mean P':>7} {'mean D':>7} {'bound step':>26} {'bound QPS':>9} {'absolute QPS':>12} "
             f"{'paced QPS':>9} {'paced step':>26}  absolute shape"]
    for b in bounds:
        paced = "-" if b.paced_qps is None else f"{b.paced_qps:.3f}"
        paced_step = (f"<= {b.pace_s * 1e3:.0f} ms: " + (b.paced.describe() if b.paced else "none fits")
                      if b.pace_s is not None else "-")
        lines.append(f"{b.trace:<12} {b.mean_prompt_tokens:>7.1f} {b.mean_decode_tokens:>7.1f} "
                     f"{b.step.describe():>26} {b.qps:>9.3f} {b.absolute_qps:>12.3f} {paced:>9} {paced_step:>26}  "
                     f"{b.absolute_kind}: {b.absolute_shape}")
    cached = [f"{b.trace} {b.cached_pct:.1f}%" for b in bounds if b.cached_pct]
    if cached:
        lines.append("mean P is the prefill computed: the prompt less the prefix the cache serves at most "
                     "(Belady's eviction at --kv-tokens): " + ", ".join(cached) + " of prompt tokens")
    return "\n".join(lines)
