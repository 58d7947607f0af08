"""The sampler alone: the batched sampler against the per-row sampler it replaced, and against its floor.

For batch sizes 1 / 32 / 128 / 256 and the settings greedy, chat (temperature 0.7, top_p 0.9), top-k
(0.7, top_k 50), chat-penalized (chat + repetition_penalty 1.1), on float32 logits of Llama-3's vocabulary
(128,256), this times one `Sampler.sample` call: its GPU span (CUDA events around the call, medians of
repeats after warm-up) and its wall time to the tokens on the host. The per-row sampler
(tests/sampling_oracle.py, niyama's sampler before) runs the same rows as the baseline, in the same run.

Floor: the sampler must read every logit once at least, so B x V x 4 bytes over the card's copy bandwidth
(measured here, bytes read + written, as engine_bench.py measures it). Two logit distributions: "flat"
(N(0, 1.3^2), what random weights give: top_p 0.9 keeps ~30% of the vocabulary) and "peaked"
(N(0, 4^2): a few dozen tokens carry 0.9). Penalized rows have a 2,000-token prompt and 200 output
tokens; their slots are taken in the warm-up, as a running request's are.

    python benchmarks/sampler_bench.py --out $OUT/sampler_bench.json
    python benchmarks/sampler_bench.py --sweep-only        # the draw kernel's block and warps, chat rows

The sweep times the draw kernel alone (`triton_sampler.draw`) on chat rows of flat logits for several
(block, warps) settings at batch 1, 128 and 256: a row is one program, so these decide how fast one SM gets
through it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from niyama.engine.sampler import MAX_ROUNDS, Sampler  # noqa: E402
from niyama.engine.sampling import SAMPLING_PRESETS, SamplingParams  # noqa: E402

from helpers import SamplerRow  # noqa: E402

VOCAB = 128_256
SETTINGS = ("greedy", "chat", "top-k", "chat-penalized")
SCALES = {"flat": 1.3, "peaked": 4.0}


def copy_bandwidth(device: torch.device) -> float:
    src = torch.full((2 * 2**30,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2 * 2**30 / statistics.median(times)


def make_rows(batch: int, setting: str, gen: torch.Generator, logprobs: int | None = None) -> list[SamplerRow]:
    params = SamplingParams(**SAMPLING_PRESETS[setting], logprobs=logprobs)
    rows = []
    for i in range(batch):
        prompt = torch.randint(0, VOCAB, (2000,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (200,), generator=gen).tolist()
        rows.append(SamplerRow(params, prompt, output, seed=i))
    return rows


def time_new(sampler: Sampler, logits: list[torch.Tensor], rows, warmup: int = 3, repeats: int = 15) -> dict:
    """gpu_s: the sampler's device time as the engine runs it, queued behind a forward pass (here a 3 ms
    sleep kernel, during which the host packs the rows and launches): from the end of that to the last
    kernel. span_s: events around the call on an idle GPU (host packing included). wall_s: to the tokens."""
    gpu, span, wall = [], [], []
    for i in range(warmup + repeats):
        x = logits[i % len(logits)].clone()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda._sleep(5_000_000)                  # ~3 ms: the forward pass the sampler follows
        ev[0].record()
        sampler.sample(x, rows)
        ev[1].record()
        ev[1].synchronize()
        torch.cuda.synchronize()
        x = logits[i % len(logits)].clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ev[2].record()
        end = torch.cuda.Event(enable_timing=True)
        draws = sampler.sample(x, rows)
        end.record()
        draws.to_host()
        t1 = time.perf_counter()
        if i >= warmup:
            gpu.append(ev[0].elapsed_time(ev[1]) / 1e3)
            span.append(ev[2].elapsed_time(end) / 1e3)
            wall.append(t1 - t0)
    return {"gpu_s": statistics.median(gpu), "span_s": statistics.median(span), "wall_s": statistics.median(wall)}


def time_old(logits: list[torch.Tensor], rows, repeats: int = 3) -> dict:
    from sampling_oracle import sample_on_device

    params = [r.params for r in rows]
    gens = [None if p.greedy else torch.Generator(device=logits[0].device).manual_seed(r.seed)
            for r, p in zip(rows, params)]
    histories = [(r.prompt_ids, r.output_ids) for r in rows]
    wall = []
    for i in range(1 + repeats):
        x = logits[i % len(logits)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_on_device(x, params, gens, histories).tolist()
        if i:
            wall.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(wall)}


SWEEP = ((2048, 8), (4096, 16), (8192, 16), (4096, 32), (8192, 32))


def sweep(device: torch.device, gen: torch.Generator) -> list[dict]:
    from niyama.engine import triton_sampler

    out = []
    for batch in (1, 128, 256):
        logits = torch.randn(batch, VOCAB, device=device) * SCALES["flat"]
        full = lambda value: torch.full((batch,), value, device=device)      # noqa: E731
        cols = dict(temperature=full(0.7), top_p=full(0.9), min_p=full(0.0), floor=full(float("-inf")),
                    seed=torch.arange(batch, device=device),
                    position=torch.zeros(batch, dtype=torch.int64, device=device))
        for block, warps in SWEEP:
            times = []
            for i in range(13):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                triton_sampler.draw(logits, **cols, max_rounds=MAX_ROUNDS, block=block, num_warps=warps)
                end.record()
                end.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) / 1e3)
            row = {"batch": batch, "block": block, "num_warps": warps, "gpu_s": statistics.median(times)}
            out.append(row)
            print(f"sweep b{batch:<4d} block {block:5d} warps {warps:3d}: {row['gpu_s'] * 1e3:7.3f} ms", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--skip-old", action="store_true", help="leave out the per-row sampler (slow at large batches)")
    ap.add_argument("--sweep-only", action="store_true", help="only the draw kernel's (block, warps) sweep")
    ap.add_argument("--out", default="benchmarks/results/sampler_bench.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(device)
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "vocab": VOCAB,
               "copy_bytes_per_s": bandwidth, "rows": []}
    print(f"{results['device']}: copy {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator().manual_seed(0)
    results["sweep"] = sweep(device, gen)
    out.write_text(json.dumps(results, indent=1))
    for scale_name, scale in ({} if args.sweep_only else SCALES).items():
        for batch in (int(b) for b in args.batches.split(",")):
            logits = [torch.randn(batch, VOCAB, device=device) * scale for _ in range(4)]
            floor = batch * VOCAB * 4 / bandwidth
            for setting in SETTINGS + ("chat+logprobs",):
                rows = make_rows(batch, "chat" if setting == "chat+logprobs" else setting, gen,
                                 5 if setting == "chat+logprobs" else None)
                new = time_new(Sampler(VOCAB, device), logits, rows)
                old = None if args.skip_old or setting == "chat+logprobs" else time_old(logits, rows)
                row = {"logits": scale_name, "batch": batch, "setting": setting, "floor_s": floor, "new": new,
                       "old": old, "gpu_over_floor": new["gpu_s"] / floor}
                results["rows"].append(row)
                print(f"{scale_name:6s} b{batch:<4d} {setting:15s} new GPU {new['gpu_s'] * 1e3:7.3f} ms "
                      f"({row['gpu_over_floor']:5.1f}x floor {floor * 1e3:.3f} ms), idle-GPU span "
                      f"{new['span_s'] * 1e3:7.3f} ms, wall {new['wall_s'] * 1e3:7.3f} ms"
                      + (f"; per-row sampler {old['wall_s'] * 1e3:8.2f} ms" if old else ""), flush=True)
                out.write_text(json.dumps(results, indent=1))
            del logits
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
