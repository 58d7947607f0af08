"""CPU generation speed: niyama's engine vs HF transformers `generate`, same model, same run.

SmolLM2-135M-Instruct (the default model), greedy, EOS ignored, random
prompts of equal length (no padding on either side), batch 1 and 8. Tokens/s
counts generated tokens over the whole call (prefill included), median of
--repeats after one warm-up. Both sides use the same thread count.

    python benchmarks/cpu_bench.py                   # bf16 and fp32, batch 1 and 8
    python benchmarks/cpu_bench.py --dtypes bfloat16 --batches 1,8,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.engine import parse_dtype  # noqa: E402
from niyama.engine.weights import resolve  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/cpu_bench.json")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    _, directory = resolve(None)           # the converted HF-style directory: transformers reads it directly
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = parse_dtype(dtype_name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
        engine = LLMEngine(dtype=dtype_name, kv_tokens=16384, policy="fcfs")
        vocab = engine.model_config.vocab_size
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen)
            n = batch * args.new_tokens

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0)
                assert out.shape[1] == args.prompt_tokens + args.new_tokens

            params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

            def run_ours():
                seqs = engine.generate(prompts.tolist(), params)
                assert all(len(s.output_ids) == args.new_tokens for s in seqs)

            t_hf, t_ours = timed(run_hf, args.repeats), timed(run_ours, args.repeats)
            row = {"dtype": dtype_name, "batch": batch, "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "hf_tok_s": round(n / t_hf, 1), "niyama_tok_s": round(n / t_ours, 1),
                   "speedup": round(t_hf / t_ours, 2)}
            rows.append(row)
            print(f"{dtype_name:9s} batch {batch:3d}: transformers {row['hf_tok_s']:7.1f} tok/s   "
                  f"niyama {row['niyama_tok_s']:7.1f} tok/s   (x{row['speedup']})", flush=True)
        del hf, engine
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)", "threads": args.threads,
              "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
