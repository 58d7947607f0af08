"""GPU correctness check: niyama's engine vs HF transformers with the same random weights.

A Llama-3-8B-shaped `LlamaForCausalLM` is initialised by transformers in bf16
on the GPU; niyama's engine (reference attention, paged KV cache, chunked
prefill) loads the very same tensors. Both decode greedily from random-token
prompts; niyama runs all prompts together in mixed batches, under several
chunk sizes. For each prompt we report how many of the tokens agree, the
largest logit difference while they agree, and at the first disagreement
the gap between HF's top two logits (a bf16 tie when it is within rounding).

    python benchmarks/gpu_check.py --out results/         # on the GPU machine (~16 GB x 2 + KV)
    python benchmarks/gpu_check.py --shape tiny --device cpu --dtype float32   # plumbing check on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.config import SHAPES  # noqa: E402
from niyama.engine.engine import parse_dtype  # noqa: E402
from niyama.predictor import load_profile  # noqa: E402
from niyama.scheduler import make_scheduler  # noqa: E402


def hf_greedy(model, ids: list[int], n: int, device) -> tuple[list[int], torch.Tensor]:
    """Greedy decode with transformers' own KV cache; logits of every step (float32)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    x = torch.tensor([ids], device=device)
    tokens, logits = [], []
    with torch.inference_mode():
        for _ in range(n):
            step = model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1].float()
            tokens.append(int(step.argmax()))
            logits.append(step)
            x = torch.tensor([[tokens[-1]]], device=device)
    return tokens, torch.stack(logits)


def use_policy(engine, policy: str, chunk: int | None) -> None:
    opts = {} if chunk is None else {"chunk_size": chunk}
    engine.scheduler = engine.replica.scheduler = make_scheduler(policy, load_profile("a100-llama3-8b"), **opts)


def record_logits(engine, force: dict | None = None, first_id: int = 0) -> dict[int, list]:
    """Keep every sampled row's logits per request; with `force`, make greedy pick the given tokens."""
    logits: dict[int, list] = {}

    def hook(seqs, lg):
        for s, row in zip(seqs, lg):
            got = logits.setdefault(s.request.request_id, [])
            got.append(row.clone())
            if force is not None:
                row.fill_(float("-inf"))
                row[force[s.request.request_id - first_id][len(got) - 1]] = 0.0

    engine.executor.logits_hook = hook
    return logits


def prefill_logits(model, prompt: list[int], tokens: list[int], device) -> torch.Tensor:
    """Logits predicting each of `tokens`, from one forward pass over prompt + tokens."""
    with torch.inference_mode():
        x = torch.tensor([prompt + tokens[:-1]], device=device)
        return model(input_ids=x).logits[0, len(prompt) - 1:].float()


def agree(a: list, b: list) -> int:
    return sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))


def maxdiff(a: list, b: list) -> float:
    return float(f"{max(float((x - y).abs().max()) for x, y in zip(a, b)):.3g}")


def meandiff(a: list, b: list) -> float:
    return float(f"{sum(float((x - y).abs().mean()) for x, y in zip(a, b)) / len(a):.3g}")


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def compare(ours_tokens, ours_logits, ref_tokens, ref_logits) -> dict:
    agree = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)) if a != b), len(ref_tokens))
    k = max(agree, 1)
    row = {"tokens_agree": agree, "of": len(ref_tokens),
           "max_abs_logit_diff": float(f"{float((ours_logits[:k] - ref_logits[:k]).abs().max()):.3g}"),
           "logit_scale": round(float(ref_logits[:k].abs().max()), 3)}
    if agree < len(ref_tokens):
        top = ref_logits[agree].topk(2).values
        row.update(hf_top2_gap=round(float(top[0] - top[1]), 5),
                   ours_logit_of_hf_token=round(float(ours_logits[agree][ref_tokens[agree]]), 4),
                   ours_logit_of_our_token=round(float(ours_logits[agree][ours_tokens[agree]]), 4))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-lens", default="37,211,650,1500")
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--attention", default="torch-reference", choices=("torch-reference", "triton"),
                    help="the engine path to check (the results in benchmarks/results are the reference's)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(LlamaConfig(**shape.to_hf()), dtype=dtype).eval()
    print(f"transformers {args.shape} in {dtype} on {device}: {time.perf_counter() - t0:.1f} s", flush=True)
    engine = LLMEngine(model=args.shape, load_format="dummy", device=args.device, dtype=args.dtype,
                       kv_tokens=args.kv_tokens, policy="fcfs", attention=args.attention)
    engine.model.load_hf_weights(dict(hf.state_dict()))
    print(engine.describe(), flush=True)

    gen = torch.Generator().manual_seed(1)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    prompts = [torch.randint(0, shape.vocab_size, (n,), generator=gen).tolist() for n in lens]
    t0 = time.perf_counter()
    refs = [hf_greedy(hf, p, args.tokens, device) for p in prompts]
    hf_s = time.perf_counter() - t0

    results = {"shape": args.shape, "dtype": str(dtype), "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "prompt_lens": lens,
               "tokens": args.tokens, "hf_seconds_one_by_one": round(hf_s, 2), "free_running": []}
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    # 1. free-running greedy, all prompts together in mixed batches, three schedules
    for policy, chunk in (("fcfs", 256), ("fcfs", 8192), ("niyama", None)):
        use_policy(engine, policy, chunk)
        logits = record_logits(engine)
        mixed = []
        engine.replica.on_step[:] = [lambda plan, res, end: mixed.append(bool(plan.prefills) and plan.num_decodes > 0)]
        t0 = time.perf_counter()
        seqs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        rows = [compare(s.output_ids, torch.stack(logits[s.request.request_id]), *ref) for s, ref in zip(seqs, refs)]
        run = {"policy": policy, "chunk_size": chunk or "dynamic", "seconds": round(wall, 2),
               "steps": len(mixed), "mixed_steps": sum(mixed), "prompts": rows}
        results["free_running"].append(run)
        print(json.dumps(run), flush=True)

    # 2. teacher-forced: niyama decodes HF's own tokens, so both see the same contexts at every step
    use_policy(engine, "fcfs", 256)
    forced = record_logits(engine, force={i: ref[0] for i, ref in enumerate(refs)}, first_id=engine.replica._num_added)
    engine.generate(prompts, params)
    ours = [torch.stack(v) for _, v in sorted(forced.items())]
    hf_dec = [ref[1] for ref in refs]
    # HF's own second opinion: the same tokens in one prefill pass instead of token-by-token decoding
    hf_pre = [prefill_logits(hf, p, ref[0], device) for p, ref in zip(prompts, refs)]
    del engine
    torch.cuda.empty_cache() if device.type == "cuda" else None
    hf32 = hf.float()                                   # the float32 oracle, same weights
    oracle = [prefill_logits(hf32, p, ref[0], device) for p, ref in zip(prompts, refs)]
    results["teacher_forced"] = {
        "steps": sum(len(r[0]) for r in refs),
        "argmax_agree_ours_vs_hf_decode": agree(ours, hf_dec),
        "argmax_agree_hf_prefill_vs_hf_decode": agree(hf_pre, hf_dec),
        "argmax_agree_ours_vs_fp32": agree(ours, oracle),
        "argmax_agree_hf_decode_vs_fp32": agree(hf_dec, oracle),
        "max_abs_diff_ours_vs_hf_decode": maxdiff(ours, hf_dec),
        "max_abs_diff_hf_prefill_vs_hf_decode": maxdiff(hf_pre, hf_dec),
        "max_abs_diff_ours_vs_fp32": maxdiff(ours, oracle),
        "max_abs_diff_hf_decode_vs_fp32": maxdiff(hf_dec, oracle),
        "mean_abs_diff_ours_vs_fp32": meandiff(ours, oracle),
        "mean_abs_diff_hf_decode_vs_fp32": meandiff(hf_dec, oracle),
        "top2_gap_fp32_where_ours_differs_from_hf": [
            round(float(g), 4) for o, h, f in zip(ours, hf_dec, oracle)
            for g, a, b in zip(top2_gap(f), o.argmax(-1), h.argmax(-1)) if a != b],
    }
    print(json.dumps(results["teacher_forced"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_check_{args.shape}.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / f'gpu_check_{args.shape}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
