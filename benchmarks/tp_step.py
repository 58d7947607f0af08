"""One engine step under tensor parallelism against its floor: decode at batch 1 and 64 (2K context each) and
a 2048-token prefill, for a model shape (random weights) split over --tp GPUs.

In one run: the card's ceilings (engine_bench.measure_ceilings: a 2 GiB device-to-device copy, bytes read +
written, and an 8192^3 GEMM in the run's dtype, on the first GPU, before the model loads), then an engine of
`--shape` with `--load-format dummy` over `--tp` ranks and a KV cache just big enough for the largest decode
batch, then each step `--repeats` times after `--warmup` through `executor.execute` (profiling.SyntheticSteps,
as `niyama profile` runs them): wall time to the sampled tokens on the host, and rank 0's GPU span (CUDA
events around everything the step enqueues; it includes waiting for the other ranks' all-reduces).

Floors (engine_bench's cost model, split over N GPUs; the bandwidth and GEMM rate are one card's):
    weights floor    weights bytes / (N x copy bandwidth)          (W = all parameters but the embedding table)
    floor            max(bytes / (N x copy bandwidth), flops / (N x GEMM rate)), bytes = weights + the
                     batch's KV (decode), flops as engine_bench counts them; "bound" names the larger
A rank really reads a bit more than 1/N of the weights: lm_head is replicated, and computed on rank 0.
Steps of up to 1,024 tokens replay CUDA graphs (every rank's, NCCL all-reduces captured) unless
--no-cuda-graphs; eager small decodes are bound by host launches.

Memory: the weights are allocated per rank (a 70B shape is ~73 GB per GPU at --tp 2, never 141 GB on one
device: each full parameter is drawn on the GPU and sliced, one at a time). Where the cards cannot also hold
the KV cache of the largest batch, that batch shrinks to what fits and the JSON says so.

    python benchmarks/tp_step.py --shape llama-3-70b --tp 2 --out $OUT/tp_70b.json
    python benchmarks/tp_step.py --shape qwen2.5-7b --tp 1 --out $OUT/tp1_qwen7b.json   # the baseline
    python benchmarks/tp_step.py --shape tiny --tp 2 --device cpu --dtype float32 --quick   # CPU smoke test

Needs torch (and triton on a GPU), not the server's packages. Results on 2 H200s:
benchmarks/results/tp_step_h200x2.json (docs/design.md, "Tensor parallelism", has the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import (FULL, QUICK, decode_cost, floor, measure_ceilings, prefill_cost,  # noqa: E402
                          weights_read)

from niyama.engine import LLMEngine  # noqa: E402
from niyama.engine.config import SHAPES  # noqa: E402
from niyama.engine.engine import parse_dtype  # noqa: E402
from niyama.engine.kv_cache import dtype_size  # noqa: E402
from niyama.engine.profiling import Shape, SyntheticSteps  # noqa: E402
from niyama.engine.tensor_parallel import Shard  # noqa: E402
from niyama.predictor import DEFAULT_PROFILE  # noqa: E402

RESERVE_BYTES = 4 * 2**30       # per GPU beside weights and KV: CUDA context, NCCL, activations of a 2K prefill


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3-70b", help=f"model shape: {', '.join(SHAPES)} (default llama-3-70b)")
    p.add_argument("--tp", type=int, default=2, help="tensor parallel size (default 2)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,64", help="decode batch sizes (default 1,64)")
    p.add_argument("--context", type=int, default=2048, help="context of each decode (default 2048)")
    p.add_argument("--prefill", type=int, default=2048, help="tokens of the prefill step (default 2048)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    p.add_argument("--quick", action="store_true", help="CPU sizes: 16 MiB copy, 256^3 GEMM, contexts of 128")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args(argv)


def kv_tokens_that_fit(args, shape, device: torch.device, size: int) -> tuple[int, int]:
    """(KV tokens per rank to allocate, the largest decode batch they hold): the largest batch of --batches,
    shrunk if the weights leave too little room on the GPU."""
    per_seq = -(-(args.context + 1) // 16) * 16
    largest = max(int(b) for b in args.batches.split(","))
    slack = 1.02       # the allocator keeps 1% of the blocks back (its watermark)
    want = int((largest * per_seq + args.prefill + 16) * slack) + 16
    if device.type != "cuda":
        return want, largest
    rank = Shard(shape, size, 0).config if size > 1 else shape
    element = dtype_size(parse_dtype(args.dtype))
    free = torch.cuda.get_device_properties(device).total_memory - rank.num_params * element - RESERVE_BYTES
    room = int(free // (rank.kv_bytes_per_token * element))
    if room >= want:
        return want, largest
    fits = max(0, int((room - 16) / slack - args.prefill - 16) // per_seq)
    return room, fits


def time_step(steps: SyntheticSteps, shape: Shape, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        steps.run(shape)
    runs = [steps.run(shape) for _ in range(repeats)]
    walls = [w for w, _ in runs]
    spans = [s for _, s in runs if s is not None]
    out = {"wall_s": statistics.median(walls), "wall_samples_s": [round(w, 6) for w in walls]}
    if spans:
        out["gpu_span_s"] = statistics.median(spans)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    shape, size = SHAPES[args.shape], args.tp
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.quick:
        args.context = min(args.context, 128)
        args.prefill = min(args.prefill, 128)
    if size > 1:
        Shard(shape, size, 0)                 # a size that does not split the model fails here, before anything
    sizes = QUICK if args.quick else FULL
    results = {"shape": args.shape, "tp": size, "dtype": args.dtype, "device": device.type,
               "cuda_graphs": not args.no_cuda_graphs,
               "torch": torch.__version__, "python": platform.python_version(),
               "model": dataclasses.asdict(shape)}
    if device.type == "cuda":
        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    ceilings = measure_ceilings(sizes, device if device.type != "cuda" else torch.device("cuda", 0), dtype)
    results["ceilings"] = ceilings
    print(f"{args.shape} x tp {size}: copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
          f"GEMM {ceilings['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s ({results.get('gpus', ['cpu'])[0]})", flush=True)

    kv_tokens, largest = kv_tokens_that_fit(args, shape, device, size)
    t0 = time.perf_counter()
    engine = LLMEngine(model=args.shape, load_format="dummy", device=args.device, dtype=args.dtype,
                       kv_tokens=kv_tokens, tensor_parallel_size=size, profile=DEFAULT_PROFILE,
                       online_correction=False, max_num_seqs=max(largest, 1), cuda_graphs=not args.no_cuda_graphs)
    results["load_s"] = time.perf_counter() - t0
    results["engine"] = engine.describe()
    print(engine.describe(), flush=True)
    try:
        engine.executor.record_gpu_span = device.type == "cuda"
        steps = SyntheticSteps(engine.executor, engine.allocator, shape.max_position, shape.vocab_size)
        element = dtype_size(dtype)
        figures = {}
        batches = [int(b) for b in args.batches.split(",")]
        for b in batches:
            if b > largest:
                figures[f"decode b{b} c{args.context}"] = {"skipped": f"KV cache for batch {largest} at most on "
                                                                      f"these GPUs beside the weights"}
                continue
            figures[f"decode b{b} c{args.context}"] = (Shape(0, 0, b, args.context),
                                                       decode_cost(shape, b, args.context, element))
        figures[f"prefill {args.prefill}"] = (Shape(args.prefill, 0, 0, 0), prefill_cost(shape, args.prefill, element))
        results["figures"] = {}
        for name, fig in figures.items():
            if isinstance(fig, dict):
                results["figures"][name] = fig
                print(f"{name:>20}: {fig['skipped']}")
                continue
            step, (nbytes, flops) = fig
            measured = time_step(steps, step, args.warmup if not args.quick else 1, args.repeats)
            bound = floor((nbytes / size, flops / size), ceilings)
            weights_s = weights_read(shape) * element / (size * ceilings["copy_bytes_per_s"])
            record = {**measured, "floor": bound, "weights_floor_s": weights_s,
                      "over_floor": measured["wall_s"] / bound["floor_s"]}
            if "gpu_span_s" in measured:
                record["gpu_span_over_floor"] = measured["gpu_span_s"] / bound["floor_s"]
            results["figures"][name] = record
            span = f", GPU span {measured['gpu_span_s'] * 1e3:8.2f} ms" if "gpu_span_s" in measured else ""
            print(f"{name:>20}: {measured['wall_s'] * 1e3:8.2f} ms{span}; floor {bound['floor_s'] * 1e3:7.2f} ms "
                  f"({bound['bound']}; weights alone {weights_s * 1e3:.2f} ms): {record['over_floor']:.2f}x",
                  flush=True)
    finally:
        t0 = time.perf_counter()
        engine.close()
        results["close_s"] = time.perf_counter() - t0
        print(f"closed in {results['close_s']:.1f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
