"""Scheduler and simulator speed on this machine's CPU.

1. Microseconds per scheduling decision (`Scheduler.schedule`) with 100,
   1,000 and 10,000 requests queued: the replica starts with that many
   requests waiting (ShareGPT lengths, random tiers) and runs `--iterations`
   iterations; the queue barely shrinks over them. Also the whole loop's
   time per iteration (schedule + simulated execute + apply).
2. Simulated requests per second for a 4-hour capacity-sized run per trace.

Usage: python benchmarks/sim_speed.py [--iterations 3000] [--out benchmarks/results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from niyama.kv import BlockAllocator
from niyama.predictor import PROFILES
from niyama.replica import Replica
from niyama.scheduler import make_scheduler
from niyama.sim import SimulatedExecutor, simulate
from niyama.sim.run import DEFAULT_KV_TOKENS
from niyama.workload import make_workload


def decision_time(policy: str, queued: int, iterations: int, seed: int = 0) -> dict:
    predictor = PROFILES["a100-llama3-8b"]
    sched = make_scheduler(policy, predictor)
    replica = Replica(sched, SimulatedExecutor(predictor), BlockAllocator.for_tokens(DEFAULT_KV_TOKENS))
    wl = make_workload("sharegpt", 1.0, num_requests=queued, seed=seed)
    for r in wl.requests():
        r.arrival_s = 0.0          # everything is waiting at once
        replica.add(r)
    samples = []
    inner = sched.schedule

    def timed(*a):
        t = time.perf_counter()
        plan = inner(*a)
        samples.append(time.perf_counter() - t)
        return plan

    sched.schedule = timed
    t0 = time.perf_counter()
    steps = 0
    while steps < iterations and (steps == 0 or len(sched.waiting) >= queued // 2):   # keep the queue near its size
        replica.step()
        steps += 1
    loop = (time.perf_counter() - t0) / steps
    return {"policy": policy, "queued": queued, "iterations": steps,
            "waiting_at_end": len(sched.waiting), "decodes_at_end": len(replica.decodes),
            "schedule_us_mean": 1e6 * statistics.fmean(samples),
            "schedule_us_p50": 1e6 * statistics.median(samples),
            "schedule_us_p99": 1e6 * sorted(samples)[int(0.99 * len(samples))],
            "loop_us_per_iteration": 1e6 * loop}


def sim_throughput(trace: str, policy: str, qps: float) -> dict:
    wl = make_workload(trace, qps)
    t0 = time.perf_counter()
    res = simulate(wl, policy)
    dt = time.perf_counter() - t0
    return {"trace": trace, "policy": policy, "qps": qps, "requests": len(wl), "iterations": res.num_iterations,
            "seconds": dt, "requests_per_s": len(wl) / dt, "iterations_per_s": res.num_iterations / dt,
            "simulated_s_per_wall_s": max(r.finish_s for r in res.requests) / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--out", default="benchmarks/results/sim_speed.json")
    args = ap.parse_args()

    decisions = []
    print(f"{'policy':<8} {'queued':>7} {'iters':>6} {'schedule us mean/p50/p99':>26} {'loop us/iter':>13}")
    for policy in ("niyama", "edf"):
        for queued in (100, 1000, 10000):
            d = decision_time(policy, queued, args.iterations)
            decisions.append(d)
            print(f"{policy:<8} {queued:>7} {d['iterations']:>6} {d['schedule_us_mean']:>10.1f} /{d['schedule_us_p50']:>6.1f} /"
                  f"{d['schedule_us_p99']:>6.1f} {d['loop_us_per_iteration']:>13.1f}")
    runs = []
    print(f"\n{'trace':<11} {'policy':<7} {'QPS':>4} {'requests':>9} {'iterations':>10} {'seconds':>8} "
          f"{'req/s':>8} {'iter/s':>8}")
    for trace, qps in (("azure-code", 4.0), ("azure-conv", 5.0), ("sharegpt", 2.0)):
        r = sim_throughput(trace, "niyama", qps)
        runs.append(r)
        print(f"{trace:<11} {'niyama':<7} {qps:>4} {r['requests']:>9} {r['iterations']:>10} {r['seconds']:>8.2f} "
              f"{r['requests_per_s']:>8.0f} {r['iterations_per_s']:>8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                               "decisions": decisions, "runs": runs}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
