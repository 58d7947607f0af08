"""Where a step's time goes: torch.profiler over the engine_bench figures, kernels grouped by name.

For each figure (decode steps replay their CUDA graphs, kernels inside a graph are still reported),
a few steps run under the profiler; the table gives the figure's wall time per step, the GPU's
summed kernel time per step (busy), and the largest kernel groups. busy << wall means the GPU waits
for the host.

    python benchmarks/engine_profile.py --out $OUT/engine_profile.json        # on the GPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_bench import SyntheticSteps  # noqa: E402

from niyama.engine import LLMEngine  # noqa: E402

FIGURES = {"decode b1 c2048": (0, 1, 2048), "decode b128 c2048": (0, 128, 2048), "prefill 2048": (2048, 0, 0),
           "prefill 8192": (8192, 0, 0), "mixed 256+64x2048": (256, 64, 2048)}


def group(name: str) -> str:
    """Kernel names carry template arguments; keep the family."""
    for key in ("prefill_attention", "decode_attention", "combine_splits", "write_kv", "_add_rms_norm", "_silu_mul",
                "_rope", "gemv", "gemm", "Memcpy", "elementwise", "reduce", "index", "argmax", "cat", "copy"):
        if key.lower() in name.lower():
            return key
    return name[:60]


def profile_figure(steps: SyntheticSteps, prefill: int, decodes: int, context: int, reps: int) -> dict:
    for _ in range(3):
        steps.run(prefill, decodes, context)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        walls = [steps.run(prefill, decodes, context) for _ in range(reps)]
    by_group: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            g = by_group[group(ev.name)]
            g[0] += ev.device_time_total / reps / 1e3          # ms per step
            g[1] += 1 / reps
    busy = sum(v[0] for v in by_group.values())
    top = sorted(by_group.items(), key=lambda kv: -kv[1][0])[:14]
    return {"wall_ms": sorted(walls)[len(walls) // 2] * 1e3, "busy_ms": busy,
            "kernels_per_step": round(sum(v[1] for v in by_group.values())),
            "groups": {k: {"ms": round(v[0], 4), "count": round(v[1], 1)} for k, v in top}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine_profile.json")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    engine = LLMEngine(model="llama-3-8b", load_format="dummy", device="cuda", dtype="bfloat16", kv_tokens=300_000,
                       cuda_graphs=not args.no_cuda_graphs)
    print(engine.describe(), flush=True)
    steps = SyntheticSteps(engine)
    results = {}
    for name, (p, d, c) in FIGURES.items():
        r = results[name] = profile_figure(steps, p, d, c, args.reps)
        print(f"\n{name}: wall {r['wall_ms']:.2f} ms, GPU busy {r['busy_ms']:.2f} ms, {r['kernels_per_step']} kernels")
        for k, v in r["groups"].items():
            print(f"   {v['ms']:8.3f} ms  x{v['count']:<6} {k}")
    graphs = engine.executor.graphs
    if graphs is not None:       # host cost of one replay call (the GPU runs it meanwhile)
        g = graphs.get(128)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.graph.replay()
        results["graph_replay_call_ms"] = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        print(f"\nreplay() call of the batch-128 graph: {results['graph_replay_call_ms']:.3f} ms of host time")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
