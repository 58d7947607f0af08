"""Measure this machine's batch times at start-up and fit the scheduler's batch-time model.

The scheduler sizes prefill chunks from predicted batch times; a profile fitted on an A100
is wrong by 10-100x on another GPU or a CPU. `--profile measure` times a fixed grid of synthetic
batches (prefill chunks with and without cached context, beside decodes with various contexts)
through the real executor (`profiling.SyntheticSteps`, as `niyama profile` does over a larger grid),
then fits the same two-regime linear model `niyama replay` fits from a replay's step log.
"""

from __future__ import annotations

from ..predictor.fit import fit_two_regime
from ..predictor.linear import TwoRegimeLinear
from .profiling import Shape, SyntheticSteps
from .runner import ModelExecutor

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
    steps = SyntheticSteps(executor, allocator, max_len, vocab_size)
    rows = []
    steps.run(Shape(16, 0, 1, 32))                # warm-up: first-call allocations, kernel selection
    for prefill, start, decodes, ctx in GRID:
        shape = Shape(*(int(v * scale) for v in (prefill, start)), decodes, int(ctx * scale))
        if steps.why_not(shape) is not None:
            continue
        seconds = steps.run(shape)[0]
        if on_gpu or seconds < 0.2:
            seconds = min([seconds] + [steps.run(shape)[0] for _ in range(2)])
        rows.append((shape.prefill_tokens, decodes, decodes * shape.decode_context,
                     shape.prefill_context if shape.prefill_tokens else 0, seconds))
    return fit_two_regime(rows, name=name), rows
