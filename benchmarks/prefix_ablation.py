"""Prefix caching on the Mooncake conversation trace, simulated (H100 profile, Llama-3-8B's 440K-token KV cache,
the long-context tiers: Q1 TTFT 20 s + TBT 50 ms, Q2 TTLT 600 s, Q3 TTLT 1800 s, assigned a third each):

1. the ceilings: the share of prompt tokens a cache could serve over the trace in order, with no memory
   limit, and with 440K tokens evicting by plain LRU or by Belady's rule (the block whose next use is
   farthest; needs the future, so no server can do it), all at 512-token trace blocks, no deadlines;
2. one replica, niyama's goodput capacity (worst tier <= 1% violations) and what caching does at that load,
   adding one piece at a time: caching with LRU eviction and the hybrid priority counting whole prompts,
   then the priority counting only uncached work, then reused-last eviction (the default);
3. a fleet of 4 replicas behind the qos router at 0.8 QPS: caching off, on without prefix affinity, on with
   it (the default).

    python benchmarks/prefix_ablation.py           # ~15 min on 2 cores
Saves benchmarks/results/prefix_ablation.json and prints the tables.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.cluster.fleet import make_fleet  # noqa: E402
from niyama.cluster.sim import simulate_cluster  # noqa: E402
from niyama.metrics import summarize  # noqa: E402
from niyama.sim.capacity_study import CapacityJob, find_capacity  # noqa: E402
from niyama.sim.run import DEFAULT_KV_TOKENS  # noqa: E402
from niyama.sim.scenario import Scenario  # noqa: E402
from niyama.workload import load_trace, make_workload  # noqa: E402

TRACE = "mooncake"


def chains(tr) -> list[list[int]]:
    out = []
    for ids in tr.block_ids:
        prev, chain = 0, []
        for h in ids:
            prev = hash((prev, h))
            chain.append(prev)
        out.append(chain)
    return out


def ceilings(kv_tokens: int) -> dict:
    """Share of prompt tokens served from a cache of trace blocks, in trace order (the last prompt token never)."""
    tr = load_trace(TRACE)
    cs = chains(tr)
    cap = kv_tokens // tr.block_tokens

    def served(n_hit_blocks: int, prompt: int) -> int:
        return min(n_hit_blocks * tr.block_tokens, (prompt - 1) // 16 * 16)

    def run(evict) -> float:
        cache: dict = {}
        hit = total = 0
        for i, (chain, p) in enumerate(zip(cs, tr.prompt_tokens)):
            k = 0
            while k < len(chain) and chain[k] in cache:
                k += 1
            hit += served(k, int(p))
            total += int(p)
            evict(cache, chain, i)
        return round(100 * hit / total, 2)

    def unbounded(cache, chain, i):
        cache.update(dict.fromkeys(chain))

    lru_cache = OrderedDict()

    def lru(cache, chain, i):
        for x in chain:
            lru_cache[x] = None
            lru_cache.move_to_end(x)
            cache[x] = None
        while len(lru_cache) > cap:
            del cache[lru_cache.popitem(last=False)[0]]

    nxt, uses = {}, [None] * len(cs)
    for i in range(len(cs) - 1, -1, -1):
        uses[i] = [nxt.get(x, 1 << 40) for x in cs[i]]
        for x in cs[i]:
            nxt[x] = i
    heap = []

    def belady(cache, chain, i):
        for x, u in zip(chain, uses[i]):
            cache[x] = u
            heapq.heappush(heap, (-u, x))
        while len(cache) > cap:
            u, x = heapq.heappop(heap)
            if cache.get(x) == -u:
                del cache[x]

    return {"unbounded_pct": run(unbounded), "lru_pct": run(lru), "belady_pct": run(belady),
            "block_reuse_pct": round(100 * _block_reuse(cs), 2)}


def _block_reuse(cs) -> float:
    seen, rep, n = set(), 0, 0
    for chain in cs:
        rep += sum(x in seen for x in chain)
        n += len(chain)
        seen.update(chain)
    return rep / n


def at_load(sc: Scenario, qps: float) -> dict:
    res = sc.simulate(qps)
    s, _ = summarize(res)
    q1 = next(t for t in s.tiers if t.name == "Q1")
    return {"hit_pct": round(res.prefix_hit_pct, 2), "worst_tier_pct": round(s.worst_tier_violation_pct, 2),
            "q1_ttft_p50_s": round(q1.ttft_s[0], 2), "q1_ttft_p99_s": round(q1.ttft_s[2], 2),
            "prefill_tokens_computed": res.prefix_query_tokens - res.prefix_hit_tokens
            if res.prefix_query_tokens else sum(r.num_prompt_tokens for r in res.requests)}


def replica_rows() -> list[dict]:
    base = Scenario(TRACE, "niyama", duration_s=4 * 3600.0)
    steps = [("caching off", dict(prefix_caching=False)),
             ("+ caching (LRU, priority counts whole prompts)",
              dict(kv_options={"eviction": "lru"}, policy_options={"prefix_aware_order": False})),
             ("+ priority counts uncached work", dict(kv_options={"eviction": "lru"})),
             ("+ reused-last eviction (default)", {})]
    rows = []
    for label, change in steps:
        sc = base.replace(**change)
        t0 = time.time()
        cap = find_capacity(CapacityJob(sc, sustainable=False))
        row = {"row": label, "goodput_qps": cap.capacity_qps, **at_load(sc, 0.22), "seconds": round(time.time() - t0)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fleet_rows(replicas: int = 4, qps: float = 0.8) -> list[dict]:
    wl = make_workload(TRACE, qps, seed=0)
    rows = []
    for label, caching, affinity in (("caching off", False, True), ("caching on, no prefix affinity", True, False),
                                     ("caching on, prefix affinity (default)", True, True)):
        fleet = make_fleet(f"shared:{replicas}", wl.tiers, policy="niyama", router="qos")
        res = simulate_cluster(wl, fleet, prefix_caching=caching,
                               router_options=None if affinity else {"prefix_affinity": False})
        s, _ = summarize(res)
        q1 = next(t for t in s.tiers if t.name == "Q1")
        row = {"row": label, "hit_pct": round(res.prefix_hit_pct, 2), "worst_tier_pct": round(s.worst_tier_violation_pct, 2),
               "q1_ttft_p50_s": round(q1.ttft_s[0], 2), "q1_ttft_p99_s": round(q1.ttft_s[2], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    out = {"ceilings_440k": ceilings(DEFAULT_KV_TOKENS), "ceilings_fleet_4x440k": ceilings(4 * DEFAULT_KV_TOKENS)}
    print(json.dumps(out), flush=True)
    out["replica"] = replica_rows()
    out["fleet_4_replicas_0.8qps"] = fleet_rows()
    path = HERE / "results" / "prefix_ablation.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
