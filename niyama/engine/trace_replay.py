"""Replay a workload (trace lengths, arrival times, tiers) on the real engine.

Traces carry lengths, not text, so each prompt is token ids of the trace's
length: random, or where the trace has prefix block ids, one fixed run of
ids per block id, so that the engine's prefix cache sees the trace's reuse
(workload/prompts.py). Each request generates exactly its trace output length
(EOS ignored), greedy or with the sampling settings of a `SamplingMix`.
Lengths are clipped to what the model and the KV cache can hold. The result is the simulator's `SimResult`, so the same report and
records come out; the measured step log comes with it, ready to fit a
batch-time profile of this machine."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..replica import Recorder, WallClock
from ..sim.run import SimResult
from ..workload import Workload, clip_lengths
from ..workload.prompts import prompt_ids
from .engine import LLMEngine
from .sampling import SamplingMix, SamplingParams

# one row per executed step; `sampled`: its rows drawn with temperature or penalties
STEP_COLUMNS = ("prefill_tokens", "decodes", "decode_context", "prefill_context", "seconds", "sampled")


@dataclass
class ReplayResult:
    result: SimResult
    steps: list[tuple[int, int, int, int, float, int]]   # STEP_COLUMNS per executed batch
    num_clipped: int                                 # requests whose lengths were cut to fit


def replay(engine: LLMEngine, workload: Workload, seed: int = 0, progress=None,
           max_prompt_tokens: int | None = None, max_output_tokens: int | None = None,
           sampling: SamplingMix | None = None) -> ReplayResult:
    """Run `workload` on `engine` in real time; `max_*_tokens` clip the trace's lengths (quick CPU runs);
    `sampling`: each request's sampling settings, drawn with `seed` (default: greedy), each with its own
    seed."""
    if engine.has_work:
        raise RuntimeError("replay needs an idle engine")
    for name, cap in (("max_prompt_tokens", max_prompt_tokens), ("max_output_tokens", max_output_tokens)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1")
    ctx = engine.model_config.max_position
    room = (engine.allocator.num_blocks - engine.allocator.num_watermark_blocks) * engine.allocator.block_size
    limit = min(ctx, room)
    ids_rng = np.random.default_rng(seed)
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    engine.set_tiers(workload.tiers, workload.rule)
    engine.replica.clock = WallClock()     # arrival times count from now
    clipped = 0
    requests = []
    for spec in workload.specs:
        prompt, out = clip_lengths(spec, limit, max_prompt_tokens, max_output_tokens)
        clipped += (out, prompt) != (spec.num_output_tokens, spec.num_prompt_tokens)
        ids = prompt_ids(spec, prompt, (0, vocab), ids_rng, workload.block_tokens, seed)
        settings = sampling.pick(rng) if sampling is not None else {"temperature": 0.0}
        params = SamplingParams(max_tokens=out, ignore_eos=True, seed=rng.getrandbits(62), **settings)
        seq = engine.add_request(ids, params, tier=spec.tier, priority=spec.priority, arrival_s=spec.arrival_s)
        requests.append(seq.request)
    steps = []
    kv, replica = engine.allocator, engine.replica
    queries0, hits0 = kv.num_query_tokens, kv.num_hit_tokens
    replica.on_step.append(lambda plan, res, end: steps.append(
        (plan.num_prefill_tokens, plan.num_decodes, plan.decode_context, plan.prefill_context, res.duration_s,
         plan.num_sampled)))
    replica.recorder = record = Recorder(replica.iteration)       # for the report; detached after (a server keeps none)
    try:
        while engine.has_work:
            engine.step()
            if progress is not None:
                progress(replica.num_unfinished)
    finally:
        replica.on_step.pop()
        replica.recorder = None
    result = SimResult(workload, engine.config.policy, requests, record.iteration_end_s, replica.iteration,
                       record.num_preemptions, record.num_relegations, kv.num_query_tokens - queries0,
                       kv.num_hit_tokens - hits0)
    return ReplayResult(result, steps, clipped)
