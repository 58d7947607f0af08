"""How well admission control's first-token prediction picks the requests to refuse, at overload (issue 29).

A tier with `on_infeasible = reject` refuses a request whose predicted first token is past its deadline. The
prediction is the prefill work queued ahead of it over a prefill rate. Two rates, in the same run on the same
requests (common random numbers):
- per-step: the moving average of each step's prefill tokens / its duration (what relegation uses; admission
  used it before issue 29). Steps without prefill do not count, so at overload, where decode-only steps run
  between chunks, it promises first tokens too early;
- while-waiting (now the default): prefill tokens per second of wall time while work waits, decode-only steps
  included.

The yardstick is the same workload with Q1 relegating instead of rejecting (nothing refused): a Q1 request
late there "should" be refused. Reported per rate: how many Q1 requests were refused, how many of the admitted
ones were late (what a client of a rejecting tier is promised), the precision of the refusals (refused and late
in the yardstick / refused) and their recall (refused and late in the yardstick / late in the yardstick).

Simulator: azure-code at 1.5x niyama's capacity (7 QPS), 80% Q1, 20 minutes, the a100 profile (the one the
admission tests use), Poisson arrivals, greedy step times.

Engine (`--engine`): the default model (SmolLM2-135M) on this machine's CPU, azure-conv clipped to 256 prompt
and 32 output tokens at an overload for it (default 2.5 QPS, 150 requests), replayed in real time, each run in
a fresh engine whose batch-time profile is the CPU's measured one.

    python benchmarks/admission_precision.py            # ~1 min on 2 cores; benchmarks/results/admission_precision.json
    python benchmarks/admission_precision.py --engine   # ~5 min; admission_precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from niyama.metrics.summary import summarize  # noqa: E402
from niyama.sim.run import simulate  # noqa: E402
from niyama.workload.build import make_workload  # noqa: E402


def late_q1(result) -> np.ndarray:
    _, rec = summarize(result)
    return np.asarray(rec["violated"]) & (np.asarray(rec["tier"]) == "Q1")


def run_engine(trace: str, qps: float, requests: int, seed: int, on_infeasible: str, waiting: bool):
    from niyama.engine import LLMEngine
    from niyama.engine.trace_replay import replay

    engine = LLMEngine(policy_options={"admission_counts_waiting_steps": waiting})
    wl = make_workload(trace, qps, num_requests=requests, seed=seed, tier_mix="80,10,10",
                       on_infeasible=on_infeasible)
    return replay(engine, wl, seed=seed, max_prompt_tokens=256, max_output_tokens=32).result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default="azure-code")
    p.add_argument("--qps", type=float, default=7.0)
    p.add_argument("--requests", type=int, default=8400)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--engine", action="store_true", help="the default model on the CPU instead of the simulator")
    p.add_argument("--out", default=None, help="the JSON (default benchmarks/results/admission_precision[_cpu].json)")
    args = p.parse_args()
    if args.engine and "--trace" not in sys.argv:
        args.trace, args.qps, args.requests = "azure-conv", 2.5, 150
    kw = dict(num_requests=args.requests, seed=args.seed, tier_mix="80,10,10")

    def run(on_infeasible: str, waiting: bool = True):
        if args.engine:
            return run_engine(args.trace, args.qps, args.requests, args.seed, on_infeasible, waiting)
        wl = make_workload(args.trace, args.qps, on_infeasible=on_infeasible, **kw)
        return simulate(wl, "niyama", policy_options={"admission_counts_waiting_steps": waiting})

    yardstick = run("relegate")
    should = late_q1(yardstick)
    rows = []
    for name, waiting in (("per-step", False), ("while-waiting", True)):
        res = run("Q1=reject", waiting)
        refused = np.array([r.rejected for r in res.requests])
        late = late_q1(res)
        q1 = np.array([r.tier.name == "Q1" for r in res.requests])
        admitted = q1 & ~refused
        hit = refused & should
        rows.append({"rate": name, "q1": int(q1.sum()), "refused": int(refused.sum()),
                     "admitted_late_pct": 100 * float(late[admitted].mean()),
                     "precision": float(hit.sum() / max(refused.sum(), 1)),
                     "recall": float(hit.sum() / max(should.sum(), 1))})
    out = {"trace": args.trace, "qps": args.qps, "requests": args.requests,
           "profile": "measured on this CPU (SmolLM2-135M engine)" if args.engine else "a100-llama3-8b",
           "arrivals": "poisson", "steps": "greedy", "yardstick_q1_late": int(should.sum()),
           "yardstick_q1_late_pct": 100 * float(should[[r.tier.name == "Q1" for r in yardstick.requests]].mean()),
           "rows": rows}
    print(f"{args.trace} at {args.qps} QPS, {args.requests} requests, 80% Q1; relegating instead: "
          f"{out['yardstick_q1_late']} Q1 late ({out['yardstick_q1_late_pct']:.1f}%)")
    print(f"{'rate':15s} {'refused':>8s} {'admitted Q1 late':>17s} {'precision':>10s} {'recall':>7s}")
    for r in rows:
        print(f"{r['rate']:15s} {r['refused']:8d} {r['admitted_late_pct']:16.1f}% {r['precision']:10.2f} "
              f"{r['recall']:7.2f}")
    path = args.out or ROOT / "benchmarks" / "results" / f"admission_precision{'_cpu' if args.engine else ''}.json"
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
