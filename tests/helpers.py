"""Build schedulers, requests and decodes by hand (no model, no trace)."""

from __future__ import annotations

from niyama.kv import BlockAllocator
from niyama.predictor import PROFILES
from niyama.qos import TIER_PRESETS, DeadlineRule
from niyama.request import Phase, Request
from niyama.running import RunningDecodes
from niyama.scheduler import make_scheduler

TIERS = {t.name: t for t in TIER_PRESETS["default"]}
RULE = DeadlineRule(output_len_pred=15)
PREDICTOR = PROFILES["a100-llama3-8b"]


def req(rid: int, arrival: float, prompt: int, output: int = 10, tier="Q1", **kw) -> Request:
    """`tier`: a default tier's name, or a Tier."""
    return Request(rid, arrival, prompt, output, TIERS[tier] if isinstance(tier, str) else tier, RULE, **kw)


def scheduler(name: str, **overrides):
    return make_scheduler(name, PREDICTOR, **overrides)


def kv(tokens: int = 440_000, **kw) -> BlockAllocator:
    return BlockAllocator.for_tokens(tokens, **kw)


def start_decode(decodes: RunningDecodes, allocator: BlockAllocator, r: Request, first_token_s: float,
                 iteration: int = 0) -> Request:
    """Put `r` into the decode set as if its prefill ended at `first_token_s` in `iteration`."""
    allocator.allocate(r, allocator.blocks_for(r.num_prompt_tokens))
    r.move_to(Phase.PREFILL)
    r.num_computed_tokens = r.num_prefill_target
    r.num_output_tokens = 1
    r.first_token_s = first_token_s
    r.anchor_s = max(first_token_s, r.first_token_deadline_s)
    r.token_segments.append([iteration, iteration + 1])
    decodes.add(r, iteration)
    return r


def chunks(plan) -> list[tuple[int, int, int]]:
    """(request id, start, tokens) for each prefill chunk of a plan."""
    return [(c.request.request_id, c.start, c.num_tokens) for c in plan.prefills]


def greedy_with_logits(engine, prompts, max_tokens: int, *, chunk_size: int, force=None):
    """Run every prompt at once through a real engine, greedy with EOS ignored (each makes `max_tokens`).
    -> (sequences in prompt order, per sequence the logits of each sampled step [steps, vocab],
    the steps' (prefill chunks, decodes)). `force`: per prompt, the tokens to feed instead of the argmax
    (teacher forcing). Checks that every KV block is free afterwards."""
    import torch

    from niyama.engine import SamplingParams

    engine.scheduler.config.chunk_size = chunk_size
    first = engine.replica._num_added         # request ids count from here, in prompt order
    logits: dict[int, list] = {}

    def hook(seqs, rows):
        for s, row in zip(seqs, rows):
            seen = logits.setdefault(s.request.request_id, [])
            seen.append(row.clone())
            if force is not None:
                row.fill_(float("-inf"))
                row[force[s.request.request_id - first][len(seen) - 1]] = 0.0

    shapes = []
    engine.executor.logits_hook = hook
    engine.replica.on_step.append(lambda plan, result, end: shapes.append((len(plan.prefills), plan.num_decodes)))
    try:
        seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    finally:
        engine.executor.logits_hook = None
        engine.replica.on_step.clear()
    assert engine.allocator.num_free == engine.allocator.num_blocks
    return seqs, [torch.stack(logits[s.request.request_id]).float() for s in seqs], shapes


class SamplerRow:
    """What the batched sampler reads of a `Sequence` (params, prompt and output ids, seed, penalty slot),
    without a request or an engine."""

    def __init__(self, params, prompt_ids=(), output_ids=(), seed: int = 0):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.output_ids = list(output_ids)
        self.seed = seed
        self.penalty_slot = None


def batched_sample(logits, params, histories=None, seeds=None, sampler=None) -> list[int]:
    """One token per row of `logits` `[n, vocab]` through the batched sampler (a fresh one unless given);
    `histories[i]`: row i's (prompt_ids, output_ids); `seeds[i]`: its seed (default i)."""
    from niyama.engine.sampler import Sampler

    n = logits.shape[0]
    histories = histories or [([], [])] * n
    rows = [SamplerRow(p, h[0], h[1], seeds[i] if seeds is not None else i)
            for i, (p, h) in enumerate(zip(params, histories))]
    sampler = sampler or Sampler(logits.shape[1], logits.device)
    return sampler.sample(logits.clone(), rows).to_host()[0]


def fleet_nodes(n: int, kv_tokens: int = 440_000, **policy) -> list:
    """`n` idle simulated niyama replicas of one shared pool, as the fleet simulator holds them."""
    from niyama.cluster import make_fleet
    from niyama.cluster.sim import Node
    from niyama.replica import Recorder, Replica
    from niyama.sim import SimulatedExecutor

    fleet = make_fleet(f"shared:{n}", tuple(TIERS.values()))
    return [Node(k, fleet.pools[0], Replica(scheduler("niyama", **policy), SimulatedExecutor(PREDICTOR),
                                            BlockAllocator.for_tokens(kv_tokens), recorder=Recorder()))
            for k in range(n)]


def queue_on(node, requests) -> None:
    """Route `requests` to `node` now, as the fleet simulator does."""
    for r in requests:
        node.replica.add(r)
        node.queued_prefill_tokens += r.num_prompt_tokens
        node.output_tokens_left += r.max_output_tokens
    node.replica.admit_arrivals()
