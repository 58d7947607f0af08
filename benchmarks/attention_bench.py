"""The Triton paged-attention kernels alone, against their floors and PyTorch's flash attention.

One layer of a Llama-3-8B-shaped cache (8 KV heads x 128, 32 query heads), random bf16 data, blocks
scattered over the cache. For each launch variant (BLOCK_N, num_warps, num_stages):
- decode (write_kv + decode_attention + combine_splits) at batch x context: bytes = K and V of every
  context token read once; floor = bytes / measured copy bandwidth;
- prefill of one chunk (no cached prefix, and 2048 tokens after 6144 cached): causal FLOPs =
  4 x q_len x (mean visible keys) x head_dim x heads; floor = FLOPs / measured bf16 GEMM rate. The peer
  is `scaled_dot_product_attention(is_causal=True)` on contiguous tensors (flash backend), which
  cannot read a paged cache.
The ceilings are measured in the same run. Prints a table; writes JSON.

    python benchmarks/attention_bench.py --out $OUT/attention_bench.json     # on the GPU, ~2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_bench import measure_ceilings  # noqa: E402

from niyama.engine.attention import SeqSlice  # noqa: E402
from niyama.engine.config import SHAPES  # noqa: E402
from niyama.engine.triton_backend import TritonPaged  # noqa: E402

BS = 16
# the best two of each from the full sweep (`--variants all`) on the H100
DECODE_VARIANTS = ((32, 4, 2), (64, 4, 2))
PREFILL_VARIANTS = ((128, 8, 2), (64, 8, 2))


def median_ms(fn, reps: int = 30) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=reps * 2, return_mode="median")


def ceilings(dev) -> dict:
    """engine_bench's ceilings (2 GiB copy, 8192^3 bf16 GEMM on random data) in this bench's units."""
    c = measure_ceilings(SimpleNamespace(copy_bytes=2**31, gemm_n=8192), dev, torch.bfloat16)
    return {"copy_GBps": c["copy_bytes_per_s"] / 1e9, "bf16_TFLOPs": c["gemm_flops_per_s"] / 1e12}


def make_cache(config, num_blocks, dev, gen):
    shape = (num_blocks, BS, config.num_kv_heads, config.head_dim)
    return (torch.randn(shape, dtype=torch.bfloat16, device=dev, generator=gen),
            torch.randn(shape, dtype=torch.bfloat16, device=dev, generator=gen))


def slices_for(lengths: list[tuple[int, int]], num_blocks: int, gen) -> list[SeqSlice]:
    """(q_len, context) per sequence, blocks drawn at random from the cache."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    out, row = [], 0
    for q_len, ctx in lengths:
        nb = -(-ctx // BS)
        out.append(SeqSlice(row, q_len, ctx, order[:nb]))
        order = order[nb:]
        row += q_len
    return out


def run_case(backend, config, kc, vc, slices, num_decodes, dev, gen):
    t = sum(s.q_len for s in slices)
    q = torch.randn(t, config.num_heads, config.head_dim, dtype=torch.bfloat16, device=dev, generator=gen)
    k = torch.randn(t, config.num_kv_heads, config.head_dim, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    # the Triton kernels alone: no chunk handed to cuDNN (the peers below time cuDNN)
    layout = dataclasses.replace(backend.exact_layout(slices, num_decodes), dense=False)
    meta = backend.prepare(slices, num_decodes, BS, dev, layout=layout)
    return median_ms(lambda: backend.forward(q, k, v, kc, vc, meta))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/attention_bench.json")
    ap.add_argument("--variants", choices=("few", "all"), default="few", help="launch variants to time")
    args = ap.parse_args()
    dev = torch.device("cuda")
    config = SHAPES["llama-3-8b"]
    gen = torch.Generator(device=dev).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    ceil = ceilings(dev)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    num_blocks = 128 * 8192 // BS + 64
    kc, vc = make_cache(config, num_blocks, dev, gen)
    kv_token_bytes = 2 * config.num_kv_heads * config.head_dim * 2
    rows = []

    backend = TritonPaged(config, dev, max_num_seqs=256, block_size=BS)
    for block_n, warps, stages in DECODE_VARIANTS if args.variants == "few" else itertools.product(
            (32, 64, 128), (4, 8), (2, 3, 4)):
        backend.decode_launch = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        for batch, ctx in ((1, 2048), (1, 8192), (32, 2048), (128, 512), (128, 2048), (64, 8192)):
            sl = slices_for([(1, ctx)] * batch, num_blocks, cpu_gen)
            ms = run_case(backend, config, kc, vc, sl, batch, dev, gen)
            floor = batch * ctx * kv_token_bytes / ceil["copy_GBps"] / 1e6
            rows.append(dict(kind="decode", batch=batch, context=ctx, BLOCK_N=block_n, num_warps=warps,
                             num_stages=stages, ms=ms, floor_ms=floor, ratio=ms / floor))
    print("decode done", flush=True)

    backend = TritonPaged(config, dev, max_num_seqs=256, block_size=BS)
    cases = ((512, 0), (2048, 0), (8192, 0), (2048, 6144))
    for block_n, warps, stages in PREFILL_VARIANTS if args.variants == "few" else itertools.product(
            (64, 128), (4, 8), (2, 3, 4)):
        backend.prefill_launch[128] = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        for q_len, cached in cases:
            sl = slices_for([(q_len, cached + q_len)], num_blocks, cpu_gen)
            try:
                ms = run_case(backend, config, kc, vc, sl, 0, dev, gen)
            except Exception as e:       # a variant that needs more shared memory than the GPU has
                print(f"prefill variant {block_n}/{warps}/{stages} failed: {type(e).__name__}", flush=True)
                break
            flops = 4 * q_len * (cached + (q_len + 1) / 2) * config.head_dim * config.num_heads
            floor = flops / ceil["bf16_TFLOPs"] / 1e9
            rows.append(dict(kind="prefill", q_len=q_len, cached=cached, BLOCK_N=block_n, num_warps=warps,
                             num_stages=stages, ms=ms, floor_ms=floor, ratio=ms / floor,
                             TFLOPs=flops / ms / 1e9))
    print("prefill done", flush=True)

    # the peers: PyTorch's fused attention on contiguous q/k/v (no paging; GQA expanded to all heads)
    sdpa = torch.nn.attention.SDPBackend
    for peer, kernel in (("sdpa-flash", sdpa.FLASH_ATTENTION), ("sdpa-cudnn", sdpa.CUDNN_ATTENTION)):
        for q_len in (512, 2048, 8192):
            q = torch.randn(1, config.num_heads, q_len, config.head_dim, dtype=torch.bfloat16, device=dev)
            k = torch.randn(1, config.num_heads, q_len, config.head_dim, dtype=torch.bfloat16, device=dev)
            v = torch.randn_like(k)
            try:
                with torch.nn.attention.sdpa_kernel(kernel):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            except RuntimeError as e:
                print(f"{peer} {q_len}: {e}".splitlines()[0][:200], flush=True)
                continue
            flops = 4 * q_len * (q_len + 1) / 2 * config.head_dim * config.num_heads
            rows.append(dict(kind=peer, q_len=q_len, cached=0, ms=ms, floor_ms=flops / ceil["bf16_TFLOPs"] / 1e9,
                             TFLOPs=flops / ms / 1e9))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                               "triton": triton.__version__, "ceilings": ceil, "rows": rows}, indent=1))
    best = {}
    for r in rows:
        key = (r["kind"], r.get("batch", r.get("q_len")), r.get("context", r.get("cached")))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print(f"{'case':<34}{'best ms':>9}{'floor':>9}{'x floor':>9}  variant")
    for (kind, a, b), r in best.items():
        variant = f"N{r.get('BLOCK_N', '-')} w{r.get('num_warps', '-')} s{r.get('num_stages', '-')}"
        print(f"{kind + f' {a} / {b}':<34}{r['ms']:>9.3f}{r['floor_ms']:>9.3f}{r['ms'] / r['floor_ms']:>9.2f}  {variant}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
