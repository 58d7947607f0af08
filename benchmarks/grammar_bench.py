"""Structured outputs' cost per step: llguidance's token masks, their application, and whole decode steps.

Three sections, in one run:
- mask: the host time to fill a step's bitmasks for B constrained rows (`Grammars.masks`, llguidance's thread
  pool), rows walking through JSON documents of a schema (an order with 40 items: objects with a patterned
  string, a bounded integer, an enum array), each row its own random valid walk. Median, p90 and max per step.
- apply: the sampler's `apply_bitmask` on [B, vocab] float32 logits, on the device (on a CPU its host path,
  `apply_bitmask_host`); floor: the bytes it must move (logits read and written, the mask read) over the card's
  copy bandwidth measured in the same run.
- engine: steady decode steps of batch B through the engine, every row sampled (temperature 0.7, top_p 0.9),
  all rows constrained against none; the step's wall time and its floor (weights and KV read once over the
  copy bandwidth, engine_bench.py's floor). The mask fill runs on the host while the GPU runs the forward pass,
  so it costs the step nothing while it is shorter than the forward.

The tokenizer is SmolLM2's (49,152 tokens, the only real one on these machines); on the GPU it is put beside
Llama-3-8B-shaped random weights (vocabulary 128,256: the mask covers the model's rows, tokens past the
tokenizer's are never allowed). A 128K tokenizer's masks would cost more: llguidance's time grows with the
tokens its lexer must check.

    python benchmarks/grammar_bench.py --out benchmarks/results                       # CPU: SmolLM2-135M
    python benchmarks/grammar_bench.py --device cuda --model llama-3.1-8b --load-format dummy \\
        --tokenizer .bench/smollm2-tokenizer --batch 64 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.grammar import Grammars, compile_json_schema  # noqa: E402
from niyama.engine.sampler import apply_bitmask, apply_bitmask_host  # noqa: E402

from engine_bench import FULL, decode_cost, device_seconds, floor, measure_ceilings, median_run  # noqa: E402

ITEM = {"type": "object", "additionalProperties": False, "required": ["sku", "qty", "tags"],
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                       "tags": {"type": "array", "maxItems": 2,
                                "items": {"type": "string", "enum": ["fragile", "cold", "bulk"]}}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["order_id", "items"],
         "properties": {"order_id": {"type": "integer"},
                        "items": {"type": "array", "minItems": 40, "maxItems": 40, "items": ITEM}}}
CHAT = dict(temperature=0.7, top_p=0.9)


class Row:
    """A stand-in sequence for `Grammars.masks`: only its matcher matters."""
    def __init__(self, matcher):
        self.matcher = matcher


def allowed_tokens(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def measure_masks(grammars: Grammars, grammar: str, batch: int, steps: int, rng: np.random.Generator) -> dict:
    rows = [Row(grammars.matcher(grammar)) for _ in range(batch)]
    times, done = [], 0
    for _ in range(steps):
        live = [r for r in rows if r.matcher is not None and not r.matcher.is_stopped()]
        if len(live) < batch:           # keep the batch full: a finished walk starts again
            for r in rows:
                if r.matcher is None or r.matcher.is_stopped():
                    r.matcher, done = grammars.matcher(grammar), done + 1
        t0 = time.perf_counter()
        idx, masks = grammars.masks(rows)
        times.append(time.perf_counter() - t0)
        for k, i in enumerate(idx):
            choice = allowed_tokens(masks[k], grammars.vocab_size)
            grammars.advance(rows[i], int(rng.choice(choice)))
    times.sort()
    return {"batch": batch, "steps": steps, "median_us": 1e6 * statistics.median(times),
            "p90_us": 1e6 * times[int(0.9 * len(times))], "max_us": 1e6 * times[-1],
            "median_us_per_row": 1e6 * statistics.median(times) / batch, "walks_finished": done}


def measure_apply(batch: int, vocab: int, device: torch.device, ceilings: dict | None) -> dict:
    words = (vocab + 31) // 32
    logits = torch.randn(batch, vocab, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, device=device)
    rows = torch.arange(batch, device=device)
    if device.type == "cuda":
        apply = lambda: apply_bitmask(logits, rows, bitmask)
    else:                                        # the sampler's CPU path: bits unpacked on the host
        host, listed = bitmask.numpy(), list(range(batch))
        apply = lambda: apply_bitmask_host(logits, listed, host)
    run = median_run(lambda: device_seconds(apply, device)[0], 5, 30)
    out = {"batch": batch, "vocab": vocab, "seconds": run["seconds"]}
    if ceilings:
        moved = batch * vocab * 4 * 2 + batch * words * 4
        out["floor_s"] = moved / ceilings["copy_bytes_per_s"]
        out["x_floor"] = run["seconds"] / out["floor_s"]
    return out


def measure_engine(engine: LLMEngine, grammar: str | None, batch: int, steps: int, prompt: list[int]) -> dict:
    """Mean wall time of `steps` decode steps with all `batch` rows decoding (after every prefill)."""
    params = SamplingParams(max_tokens=4000, ignore_eos=grammar is None, grammar=grammar, **CHAT)
    seqs = [engine.add_request(prompt, params) for _ in range(batch)]
    while any(s.request.phase.name != "DECODE" for s in seqs if not s.finished):
        engine.step()
    mask_s, masks = [], engine.executor.grammars.masks

    def timed(rows):
        t0 = time.perf_counter()
        out = masks(rows)
        mask_s.append(time.perf_counter() - t0)
        return out
    engine.executor.grammars.masks = timed
    times, finished = [], 0
    try:
        for _ in range(steps):
            if engine.replica.decodes.__len__() < batch:
                break
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        finished = sum(s.finished for s in seqs)    # before the abort below ends them all
    finally:
        engine.executor.grammars.masks = masks
        engine.abort_all()
        while engine.has_work:
            engine.step()
    return {"constrained": grammar is not None, "batch": batch, "steps": len(times),
            "step_s": statistics.mean(times), "median_step_s": statistics.median(times),
            "mask_fill_s": statistics.mean(mask_s) if grammar is not None else 0.0,
            "finished_early": finished}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer", default=None, help="a tokenizer for dummy weights (a dir with tokenizer.json)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None, help="directory for grammar_bench_<device>.json")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    engine = LLMEngine(model=args.model, load_format=args.load_format, tokenizer=args.tokenizer,
                       device=args.device, max_num_seqs=max(args.batch, 8), policy="fcfs")
    vocab = engine.model_config.vocab_size
    grammar = compile_json_schema(ORDER)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "model": engine.model_name, "vocab": vocab, "tokenizer_tokens": engine.tokenizer.vocab_size,
               "schema": "order of 40 items (patterned string, bounded integer, enum array)"}
    ceilings = measure_ceilings(FULL, device, engine.dtype) if device.type == "cuda" else None
    results["ceilings"] = ceilings
    grammars = engine.executor.grammars
    grammars.matcher(grammar)                   # builds the token table once (not timed below)
    results["mask"] = [measure_masks(grammars, grammar, b, 200, rng) for b in (1, 16, args.batch, 2 * args.batch)]
    for m in results["mask"]:
        print(f"mask fill, batch {m['batch']:4d}: median {m['median_us']:8.0f} us  p90 {m['p90_us']:8.0f} us  "
              f"({m['median_us_per_row']:.1f} us/row)")
    results["apply"] = [measure_apply(b, vocab, device, ceilings) for b in (1, args.batch, 2 * args.batch)]
    for a in results["apply"]:
        print(f"apply bitmask, batch {a['batch']:4d}: {1e6 * a['seconds']:8.1f} us"
              + (f"  ({a['x_floor']:.2f}x its floor)" if "x_floor" in a else ""))
    prompt = engine.tokenizer.encode(engine.chat_prompt(
        [{"role": "user", "content": "List the order's items as JSON."}])) if engine.tokenizer.chat_template \
        else list(range(10, 40))
    runs = [measure_engine(engine, g, args.batch, args.steps, prompt) for g in (None, grammar, None, grammar)]
    results["engine"] = runs
    for r in runs:
        fl = ""
        if ceilings:
            context = len(prompt) + 50
            r["floor_s"] = floor(decode_cost(engine.model_config, args.batch, context, 2), ceilings)["floor_s"]
            fl = f"  ({r['step_s'] / r['floor_s']:.2f}x its floor)"
        print(f"engine decode batch {r['batch']}, {'constrained  ' if r['constrained'] else 'unconstrained'}: "
              f"{1e3 * r['step_s']:7.2f} ms/step, mask fill {1e3 * r['mask_fill_s']:6.2f} ms{fl}")
    plain = statistics.mean(r["step_s"] for r in runs if not r["constrained"])
    masked = statistics.mean(r["step_s"] for r in runs if r["constrained"])
    results["overhead"] = {"plain_s": plain, "constrained_s": masked, "ratio": masked / plain}
    print(f"constrained / unconstrained step: {masked / plain:.3f}")
    if args.out:
        out = Path(args.out) / f"grammar_bench_{'h100' if device.type == 'cuda' else 'cpu'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
