"""Prefix caching on the real engine: the first requests of the Mooncake trace replayed in real time (each
prompt's block ids become fixed runs of token ids, so equal ids are equal tokens), beside the simulator on the
same workload (lengths as the replay ran them, the engine's KV size and profile), with caching on or off.

    python benchmarks/prefix_replay.py --model llama-3.1-8b --load-format dummy --device cuda \\
        --requests 120 --qps 0.6 --tag h100                       # caching on
    python benchmarks/prefix_replay.py ... --no-prefix-caching    # off (run each in its own process)
    python benchmarks/prefix_replay.py --compare benchmarks/results/prefix_replay_h100_on.json \\
        benchmarks/results/prefix_replay_h100_off.json
    python benchmarks/prefix_replay.py --requests 12 --qps 2 --max-prompt-tokens 1024 \\
        --max-output-tokens 8 --tag cpu                           # CPU, the default model (a smoke run)

Saves benchmarks/results/prefix_replay_<tag>_<on|off>.json (or --out DIR): per side (engine, simulator) the
prefill tokens looked up and found cached, the prefill tokens computed, TTFT p50 per tier, and for the engine
each step's predicted time against its measured one (median and p90 of |predicted - measured| / measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.metrics import summarize  # noqa: E402
from niyama.sim import simulate  # noqa: E402
from niyama.workload import make_workload  # noqa: E402


def ttft_p50(summary) -> dict:
    return {t.name: round(t.ttft_s[0], 3) for t in summary.tiers if t.count}


def side(result, summary) -> dict:
    computed = result.prefix_query_tokens - result.prefix_hit_tokens
    return {"prefix_query_tokens": result.prefix_query_tokens, "prefix_hit_tokens": result.prefix_hit_tokens,
            "prefix_hit_pct": round(result.prefix_hit_pct, 2), "prefill_tokens_computed": computed,
            "ttft_p50_s": ttft_p50(summary), "violation_pct": {t.name: round(t.violation_pct, 2) for t in summary.tiers}}


def run(args) -> dict:
    from niyama.engine import LLMEngine, EngineConfig
    from niyama.engine.trace_replay import replay

    from niyama.engine.sampling import SamplingMix

    # trace arrivals: Mooncake's own times (its bursts), scaled to --qps
    wl = make_workload("mooncake", args.qps, num_requests=args.requests, seed=args.seed, arrival=args.arrival)
    sampling = SamplingMix.parse(args.sampling)
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                    kv_tokens=args.kv_tokens, prefix_caching=not args.no_prefix_caching,
                                    profile=args.profile))
    print(engine.describe(), flush=True)
    steps = []       # (predicted, measured, prefill tokens)
    engine.add_step_hook(lambda plan, result, end: steps.append(
        (plan.predicted_s, result.duration_s, plan.num_prefill_tokens)))
    out = replay(engine, wl, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                 max_output_tokens=args.max_output_tokens, sampling=None if args.sampling == "greedy" else sampling)
    pred, meas, prefill = (np.array(c, dtype=float) for c in zip(*steps))
    err = np.abs(pred - meas) / meas
    computed = int(prefill.sum())
    summary, _ = summarize(out.result)
    engine_side = side(out.result, summary)
    assert engine_side["prefill_tokens_computed"] == computed, "the allocator's counters and the steps disagree"
    engine_side.update({"steps": len(steps), "step_error_median_pct": round(100 * float(np.median(err)), 2),
                        "step_error_p90_pct": round(100 * float(np.percentile(err, 90)), 2),
                        "prefill_step_error_median_pct": round(100 * float(np.median(err[prefill > 0])), 2)
                        if (prefill > 0).any() else None})
    # the simulator on the lengths the replay ran, with the engine's KV cache and profile
    ran = {r.request_id: (r.num_prompt_tokens, r.max_output_tokens) for r in out.result.requests}
    specs = [replace(s, num_prompt_tokens=ran[i][0], num_output_tokens=ran[i][1], sampled=args.sampling != "greedy")
             for i, s in enumerate(wl.specs)]
    kv = engine.allocator
    profile = args.sim_profile
    if profile is None:           # the profile the engine planned with, uncorrected
        profile = str(Path(args.out) / f"prefix_replay_{args.tag}_profile.json")
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        Path(profile).write_text(json.dumps(engine.profile.to_dict()))
    sim = simulate(replace(wl, specs=specs), engine.config.policy, profile=profile,
                   kv_tokens=kv.num_blocks * kv.block_size, prefix_caching=not args.no_prefix_caching)
    sim_summary, _ = summarize(sim)
    return {"device": engine.describe().splitlines()[0], "requests": args.requests, "qps": args.qps,
            "arrival": args.arrival, "sampling": args.sampling,
            "prefix_caching": not args.no_prefix_caching, "kv_tokens": kv.num_blocks * kv.block_size,
            "clipped": out.num_clipped, "prompt_tokens": sum(v[0] for v in ran.values()),
            "engine": engine_side, "simulator": side(sim, sim_summary)}


def compare(on_path: str, off_path: str) -> str:
    on, off = (json.loads(Path(p).read_text()) for p in (on_path, off_path))
    lines = [f"{on['requests']} Mooncake requests at {on['qps']} QPS ({on.get('arrival', 'poisson')} arrivals, "
             f"{on.get('sampling', 'greedy')}), {on['prompt_tokens']} prompt tokens; "
             f"{on['device']}",
             f"{'':<28}{'engine on':>12}{'engine off':>12}{'sim on':>10}{'sim off':>10}"]
    rows = [("prefix hit % of prefill", "prefix_hit_pct"), ("prefill tokens computed", "prefill_tokens_computed")]
    for label, key in rows:
        lines.append(f"{label:<28}{on['engine'][key]:>12}{off['engine'][key]:>12}{on['simulator'][key]:>10}"
                     f"{off['simulator'][key]:>10}")
    for tier in on["engine"]["ttft_p50_s"]:
        lines.append(f"{'TTFT p50 ' + tier + ' (s)':<28}{on['engine']['ttft_p50_s'][tier]:>12}"
                     f"{off['engine']['ttft_p50_s'].get(tier, float('nan')):>12}{on['simulator']['ttft_p50_s'][tier]:>10}"
                     f"{off['simulator']['ttft_p50_s'].get(tier, float('nan')):>10}")
    for key in ("step_error_median_pct", "step_error_p90_pct", "prefill_step_error_median_pct"):
        lines.append(f"{key:<28}{on['engine'][key]:>12}{off['engine'][key]:>12}")
    drop_engine = 1 - on["engine"]["prefill_tokens_computed"] / off["engine"]["prefill_tokens_computed"]
    lines.append(f"prefill computed drops {100 * drop_engine:.1f}% on the engine; the simulator's hit rate "
                 f"{on['simulator']['prefix_hit_pct']}% (engine's {on['engine']['prefix_hit_pct']}%)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--kv-tokens", type=int, default=None)
    p.add_argument("--profile", default="auto", help="the engine's batch-time profile (default auto)")
    p.add_argument("--sim-profile", default=None, help="the simulator's (default: the engine's shipped one)")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--qps", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--arrival", choices=("poisson", "trace"), default="poisson",
                   help="poisson at --qps, or the trace's own arrival times scaled to --qps")
    p.add_argument("--sampling", default="greedy",
                   help="greedy, or a single setting of `niyama replay --sampling` such as chat (t 0.7, top_p 0.9)")
    p.add_argument("--tag", default="run")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--compare", nargs=2, metavar=("ON_JSON", "OFF_JSON"))
    args = p.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return 0
    res = run(args)
    path = Path(args.out) / f"prefix_replay_{args.tag}_{'off' if args.no_prefix_caching else 'on'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
