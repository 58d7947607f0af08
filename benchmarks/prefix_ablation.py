"""Prefix caching on the Mooncake conversation trace, simulated (the H100 profile, h100-llama3-8b; Llama-3-8B's
440K-token KV cache,
the long-context tiers: Q1 TTFT 20 s + TBT 50 ms, Q2 TTLT 600 s, Q3 TTLT 1800 s, assigned a third each):

1. the ceilings: the share of prompt tokens a cache could serve over the trace in order, with no memory
   limit, and with 440K tokens evicting by plain LRU or by Belady's rule (the block whose next use is
   farthest; needs the future, so no server can do it), all at 512-token trace blocks, no deadlines;
2. one replica, niyama's goodput capacity (worst tier <= 1% violations) and what caching does at that load,
   adding one piece at a time: caching with LRU eviction and the hybrid priority counting whole prompts,
   then the priority counting only uncached work, then reused-last eviction (the default);
3. a fleet of 4 replicas behind the qos router at 90% of four caching-off replicas' goodput: caching off, on
   without prefix affinity, on with it (the default).

    python benchmarks/prefix_ablation.py           # ~15 min on 2 cores
Saves benchmarks/results/prefix_ablation.json and prints the tables.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.cluster.fleet import make_fleet  # noqa: E402
from niyama.cluster.sim import simulate_cluster  # noqa: E402
from niyama.metrics import summarize  # noqa: E402
from niyama.sim.capacity_study import CapacityJob, find_capacity  # noqa: E402
from niyama.sim.run import DEFAULT_KV_TOKENS  # noqa: E402
from niyama.sim.scenario import Scenario  # noqa: E402
from niyama.workload import make_workload  # noqa: E402
from niyama.workload.reuse import cached_prefixes  # noqa: E402

TRACE = "mooncake"
PROFILE = "h100-llama3-8b"


def ceilings(kv_tokens: int) -> dict:
    """Share of prompt tokens a cache of trace blocks could serve in trace order (workload/reuse.py)."""
    wl = make_workload(TRACE, 1.0, seed=0)
    total = sum(s.num_prompt_tokens for s in wl.specs)

    def pct(kv, eviction="belady") -> float:
        return round(100 * float(cached_prefixes(wl.specs, wl.block_tokens, kv, eviction).sum()) / total, 2)

    return {"unbounded_pct": pct(None), "lru_pct": pct(kv_tokens, "lru"), "belady_pct": pct(kv_tokens)}


def at_load(sc: Scenario, qps: float) -> dict:
    res = sc.simulate(qps)
    s, _ = summarize(res)
    q1 = next(t for t in s.tiers if t.name == "Q1")
    return {"hit_pct": round(res.prefix_hit_pct, 2), "worst_tier_pct": round(s.worst_tier_violation_pct, 2),
            "q1_ttft_p50_s": round(q1.ttft_s[0], 2), "q1_ttft_p99_s": round(q1.ttft_s[2], 2),
            "prefill_tokens_computed": res.prefix_query_tokens - res.prefix_hit_tokens
            if res.prefix_query_tokens else sum(r.num_prompt_tokens for r in res.requests)}


def replica_rows() -> list[dict]:
    base = Scenario(TRACE, "niyama", profile=PROFILE, duration_s=4 * 3600.0)
    steps = [("caching off", dict(prefix_caching=False)),
             ("+ caching (LRU, priority counts whole prompts)",
              dict(kv_options={"eviction": "lru"}, policy_options={"prefix_aware_order": False})),
             ("+ priority counts uncached work", dict(kv_options={"eviction": "lru"})),
             ("+ reused-last eviction (default)", {})]
    rows, load = [], None
    for label, change in steps:
        sc = base.replace(**change)
        t0 = time.time()
        cap = find_capacity(CapacityJob(sc, sustainable=False))
        load = load or round(cap.capacity_qps, 2)       # every row at caching-off's goodput
        row = {"row": label, "goodput_qps": round(cap.capacity_qps, 3), "at_qps": load, **at_load(sc, load),
               "seconds": round(time.time() - t0)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fleet_rows(qps: float, replicas: int = 4) -> list[dict]:
    wl = make_workload(TRACE, qps, seed=0)
    rows = []
    for label, caching, affinity in (("caching off", False, True), ("caching on, no prefix affinity", True, False),
                                     ("caching on, prefix affinity (default)", True, True)):
        fleet = make_fleet(f"shared:{replicas}", wl.tiers, policy="niyama", router="qos")
        res = simulate_cluster(wl, fleet, profile=PROFILE, prefix_caching=caching,
                               router_options=None if affinity else {"prefix_affinity": False})
        s, _ = summarize(res)
        q1 = next(t for t in s.tiers if t.name == "Q1")
        row = {"row": label, "qps": qps, "hit_pct": round(res.prefix_hit_pct, 2), "worst_tier_pct": round(s.worst_tier_violation_pct, 2),
               "q1_ttft_p50_s": round(q1.ttft_s[0], 2), "q1_ttft_p99_s": round(q1.ttft_s[2], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    out = {"ceilings_440k": ceilings(DEFAULT_KV_TOKENS), "ceilings_fleet_4x440k": ceilings(4 * DEFAULT_KV_TOKENS)}
    print(json.dumps(out), flush=True)
    out["replica"] = replica_rows()
    fleet_qps = round(4 * 0.9 * out["replica"][0]["goodput_qps"], 2)     # 90% of four caching-off replicas
    out["fleet_4_replicas"] = fleet_rows(fleet_qps)
    path = HERE / "results" / "prefix_ablation.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
