"""What prefix caching's bookkeeping costs the replica loop per step, at ~256 running requests.

The simulator's loop (no model: the step itself costs nothing, so what is left is the scheduler's and the KV
allocator's Python) runs a chat-like workload whose prompts share a system prompt and resend earlier turns,
at a load that keeps ~256 requests running, with caching on and off. Every allocator call is timed
(`start`, `allocate`, `commit`, `release`, `cached_tokens`); per step we report their total and the whole
loop's time.

    python benchmarks/prefix_cache_cost.py            # ~1 min on 2 cores
Saves benchmarks/results/prefix_cache_cost.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama import kv as kv_module  # noqa: E402
from niyama.sim import simulate  # noqa: E402
from niyama.workload import make_workload  # noqa: E402

TIMED = ("start", "allocate", "commit", "release", "cached_tokens")


def chat_workload(n: int, qps: float, seed: int = 0):
    """`n` requests: a 512-token system prompt shared by all, then conversations of up to 8 turns of 512 tokens,
    each turn resending the earlier ones (512-token blocks of ids, as Mooncake's hash_ids); 400 output tokens."""
    rng = np.random.default_rng(seed)
    base = make_workload("azure-conv", qps, num_requests=n, seed=seed)
    specs, next_id, live = [], 10, []
    for s in base.specs:
        if live and rng.random() < 0.5:          # a next turn of a running conversation
            k = int(rng.integers(len(live)))
            history = live[k]
        else:
            history = (0,)                       # the system prompt's block
        ids = history + (next_id,)
        next_id += 1
        live.append(ids) if len(ids) < 9 else None
        specs.append(replace(s, num_prompt_tokens=len(ids) * 512 - 100, num_output_tokens=400, block_ids=ids))
    return replace(base, specs=specs)


def measure(wl, caching: bool) -> dict:
    spent = {name: 0.0 for name in TIMED}
    calls = {name: 0 for name in TIMED}
    originals = {name: getattr(kv_module.BlockAllocator, name) for name in TIMED}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
                calls[name] += 1
        return wrapper

    running = []
    for name, fn in originals.items():
        setattr(kv_module.BlockAllocator, name, timed(name, fn))
    try:
        t0 = time.perf_counter()
        res = simulate(wl, "niyama", prefix_caching=caching, kv_tokens=1_000_000,
                       on_step=lambda plan, result, end: running.append(plan.num_decodes + len(plan.prefills)))
        wall = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(kv_module.BlockAllocator, name, fn)
    steps = res.num_iterations
    busy = np.array(running) >= 200
    return {"prefix_caching": caching, "steps": steps, "mean_running": round(float(np.mean(running)), 1),
            "steps_with_200_plus_running_pct": round(100 * float(busy.mean()), 1),
            "prefix_hit_pct": round(res.prefix_hit_pct, 1), "loop_us_per_step": round(1e6 * wall / steps, 1),
            "kv_us_per_step": round(1e6 * sum(spent.values()) / steps, 2),
            "kv_us_per_step_by_call": {k: round(1e6 * v / steps, 2) for k, v in spent.items()},
            "calls_per_step": {k: round(v / steps, 2) for k, v in calls.items()}}


def main() -> int:
    wl = chat_workload(6000, float(sys.argv[1]) if len(sys.argv) > 1 else 12.0)
    rows = [measure(wl, caching) for caching in (True, False)]
    for r in rows:
        print(f"caching {'on ' if r['prefix_caching'] else 'off'}: {r['steps']} steps, {r['mean_running']} running "
              f"on average ({r['steps_with_200_plus_running_pct']}% of steps with 200+), hits {r['prefix_hit_pct']}%; "
              f"loop {r['loop_us_per_step']} us/step, allocator {r['kv_us_per_step']} us/step "
              f"{r['kv_us_per_step_by_call']}")
    out = HERE / "results" / "prefix_cache_cost.json"
    out.write_text(json.dumps({"workload": f"chat-like, {len(wl)} requests at {wl.qps} QPS, 1 M-token KV, niyama",
                               "runs": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
