"""Measure this machine's batch times at start-up and fit the scheduler's batch-time model.

The scheduler sizes prefill chunks from predicted batch times; a profile fitted on an A100
is wrong by 10-100x on another GPU or a CPU. `--profile measure` times a fixed grid of synthetic
batches (prefill chunks with and without cached context, beside decodes with various contexts)
through the real executor, then fits the same two-regime linear model `niyama replay` fits from a
replay's step log. Random token ids: batch time does not depend on token values.
"""

from __future__ import annotations

import math

import torch

from ..predictor.fit import fit_two_regime
from ..predictor.linear import TwoRegimeLinear
from ..qos import TIER_PRESETS, DeadlineRule
from ..request import Request
from ..scheduler import BatchPlan, PrefillChunk
from .runner import ModelExecutor
from .sampling import SamplingParams
from .sequence import Sequence

# (prefill chunk tokens, context already cached before the chunk, decodes, context of each decode).
# Both regimes of the fit (<= 512 total tokens and above) get at least 6 rows, and the features
# (prefill, decodes, decode context, prefill context) vary independently.
GRID = (
    (0, 0, 1, 128), (0, 0, 8, 256), (0, 0, 32, 512), (64, 0, 0, 0), (256, 0, 0, 0), (256, 256, 0, 0),
    (128, 0, 8, 256), (64, 0, 32, 128), (384, 0, 16, 1024),
    (1024, 0, 0, 0), (768, 0, 0, 0), (768, 512, 0, 0), (1024, 0, 16, 256), (640, 0, 32, 512), (896, 0, 8, 1024),
)


def calibrate(executor: ModelExecutor, allocator, max_len: int, vocab_size: int, name: str,
              scale: float = 1.0) -> tuple[TwoRegimeLinear, list[tuple]]:
    """Time GRID (token counts x `scale`, cut to what the KV cache and context hold); return the fitted
    profile and the measured rows (prefill tokens, decodes, decode context, prefill context, seconds).

    Each row is the fastest of several runs: the first run of a new batch shape on a GPU pays one-off
    costs (kernel selection, allocator growth) that were measured at 10-30x the steady time on an H100.
    On a CPU, where a long batch costs seconds, rows over 0.2 s run once."""
    on_gpu = executor.device.type != "cpu"
    gen = torch.Generator().manual_seed(0)
    tier = TIER_PRESETS["default"][0]
    rule = DeadlineRule()
    ids = iter(range(-1, -10**9, -1))       # negative ids: never confused with served requests
    room = (allocator.num_blocks - allocator.num_watermark_blocks) * allocator.block_size

    def seq(context: int, outputs: int) -> Sequence:
        prompt = torch.randint(0, vocab_size, (context - outputs,), generator=gen).tolist()
        req = Request(next(ids), 0.0, len(prompt), max(1, outputs + 1), tier, rule)
        s = Sequence(req, prompt, SamplingParams(max_tokens=max(1, outputs + 1), temperature=0, ignore_eos=True),
                     None, (), None)
        s.output_ids = prompt[-outputs:] if outputs else []
        allocator.allocate(req, allocator.blocks_for(context + 1))
        executor.add(s)
        return s

    def timed(prefill: int, start: int, decodes: int, ctx: int) -> float:
        made = []
        try:
            chunk = []
            if prefill:
                s = seq(start + prefill, 0)
                made.append(s)
                chunk = [PrefillChunk(s.request, start, prefill)]
            decode_reqs = []
            for _ in range(decodes):
                s = seq(ctx, 1)
                made.append(s)
                decode_reqs.append(s.request)
            plan = BatchPlan(0, decodes, decodes * ctx, chunk, prefill + decodes, math.inf)
            return executor.execute(plan, decode_reqs).duration_s
        finally:
            for s in made:
                executor.release(s.request)
                allocator.release(s.request)
            executor.take_released()

    rows = []
    timed(16, 0, 1, 32)                      # warm-up: first-call allocations, kernel selection
    for prefill, start, decodes, ctx in GRID:
        prefill, start, ctx = (int(v * scale) for v in (prefill, start, ctx))
        if prefill == 0 and decodes == 0:
            continue
        need = start + prefill + 1 + decodes * (ctx + 1)
        if need > room or start + prefill >= max_len or ctx >= max_len or (decodes and ctx < 2):
            continue
        seconds = timed(prefill, start, decodes, ctx)
        if on_gpu or seconds < 0.2:
            seconds = min([seconds] + [timed(prefill, start, decodes, ctx) for _ in range(2)])
        rows.append((prefill, decodes, decodes * ctx, start if prefill else 0, seconds))
    return fit_two_regime(rows, name=name), rows
