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


def idle_gaps(kernels: list, reps: int) -> dict:
    """GPU idle time between consecutive kernels of a step (gaps over 2 ms separate steps: the host
    builds the next synthetic step there), and the largest gaps with the kernels around them."""
    kernels.sort(key=lambda k: k[0])
    gaps = [(b[0] - a[1], a[2], b[2]) for a, b in zip(kernels, kernels[1:]) if b[0] - a[1] < 2000]
    top = sorted(gaps, reverse=True)[:6]
    return {"idle_ms_per_step": sum(g[0] for g in gaps) / reps / 1e3,
            "gaps_over_20us_per_step": sum(g[0] > 20 for g in gaps) / reps,
            "largest_us": [(round(g[0], 1), group(g[1]), group(g[2])) for g in top]}


def host_timed(engine):
    """Host seconds spent inside model.forward (enqueueing kernels; a hidden sync would show here)."""
    model = engine.executor.model
    spent = []
    orig = model.forward

    def forward(*a, **kw):
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        spent.append(time.perf_counter() - t0)
        return out

    model.forward = forward
    return spent


def profile_figure(steps: SyntheticSteps, prefill: int, decodes: int, context: int, reps: int,
                   prefix: int = 0) -> dict:
    for _ in range(3):
        steps.run(prefill, decodes, context, prefix)
    spent = host_timed(steps.engine)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        walls = [steps.run(prefill, decodes, context, prefix) for _ in range(reps)]
    del steps.engine.executor.model.forward
    by_group: dict[str, list] = defaultdict(lambda: [0.0, 0])
    kernels = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            g = by_group[group(ev.name)]
            g[0] += ev.device_time_total / reps / 1e3          # ms per step
            g[1] += 1 / reps
            kernels.append((ev.time_range.start, ev.time_range.end, ev.name))
    busy = sum(v[0] for v in by_group.values())
    top = sorted(by_group.items(), key=lambda kv: -kv[1][0])[:14]
    return {"wall_ms": sorted(walls)[len(walls) // 2] * 1e3, "busy_ms": busy,
            "host_forward_ms": sorted(spent)[len(spent) // 2] * 1e3 if spent else None,
            "kernels_per_step": round(sum(v[1] for v in by_group.values())), **idle_gaps(kernels, reps),
            "groups": {k: {"ms": round(v[0], 4), "count": round(v[1], 1)} for k, v in top}}


def launch_costs(engine) -> dict:
    """Host microseconds per call of each op the forward launches (no sync: the GPU absorbs the work)."""
    import torch.nn.functional as F

    c, dev = engine.model_config, engine.device
    ops, backend, layer = engine.model.ops, engine.executor.backend, engine.model.layers[0]
    x = torch.randn(64, c.hidden_size, device=dev, dtype=engine.dtype)
    qkv = torch.randn(64, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, device=dev, dtype=engine.dtype)
    gate_up = torch.randn(64, 2 * c.intermediate_size, device=dev, dtype=engine.dtype)
    positions = torch.arange(64, device=dev)
    rope = ops.rope_state(positions, engine.model.inv_freq, engine.dtype)
    cases = {"add_rms_norm (triton)": lambda: ops.add_rms_norm(x, x, layer.input_norm, 1e-5),
             "silu_mul (triton)": lambda: ops.silu_mul(gate_up),
             "rope_qkv (triton)": lambda: ops.rope_qkv(qkv, c.num_heads, c.num_kv_heads, c.head_dim, rope),
             "F.linear": lambda: F.linear(x, layer.o_proj),
             "torch add": lambda: x + x}
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine_profile.json")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--figure", action="append", default=[], metavar="PREFILL,DECODES,CONTEXT[,PREFIX]",
                    help="profile this step instead of the default figures (repeatable); PREFIX: tokens cached "
                         "before the prefill chunk")
    args = ap.parse_args()
    figures = {}
    for f in args.figure:
        p, d, c, *rest = (int(x) for x in f.split(","))
        figures[f"mixed {p}(+{rest[0] if rest else 0} cached)+{d}x{c}"] = (p, d, c, *rest)
    engine = LLMEngine(model="llama-3-8b", load_format="dummy", device="cuda", dtype="bfloat16", kv_tokens=300_000,
                       cuda_graphs=not args.no_cuda_graphs)
    print(engine.describe(), flush=True)
    steps = SyntheticSteps(engine)
    results = {}
    for name, (p, d, c, *prefix) in (figures or FIGURES).items():
        r = results[name] = profile_figure(steps, p, d, c, args.reps, *prefix)
        timing = engine.executor.last_timing
        r["last_timing_ms"] = {k: round(v * 1e3, 3) for k, v in vars(timing).items()}

        print(f"\n{name}: wall {r['wall_ms']:.2f} ms, GPU busy {r['busy_ms']:.2f} ms, idle between kernels "
              f"{r['idle_ms_per_step']:.2f} ms, host in forward {r['host_forward_ms'] or 0:.2f} ms, "
              f"{r['kernels_per_step']} kernels; largest gaps (us) {r['largest_us'][:4]}")
        print(f"   host stages of the last step (ms): {r['last_timing_ms']}")
        for k, v in r["groups"].items():
            print(f"   {v['ms']:8.3f} ms  x{v['count']:<6} {k}")
    results["launch_us"] = launch_costs(engine)
    print("\nhost us per launch:", {k: round(v, 1) for k, v in results["launch_us"].items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
