"""Size the KV cache so that no step can run out of GPU memory mid-flight.

Before the KV cache exists, the engine runs the worst batches the scheduler can plan through the
real model, on a throwaway cache of just the blocks they touch, and reads the allocator's peak:
- the largest flat batch: one prefill chunk filling `max_batch_tokens` minus one token per other
  sequence, beside `max_num_seqs - 1` decodes, with logits for every sequence (eager path);
- the largest CUDA-graph bucket (1,024 tokens), whose activations the graphs' memory pool keeps for
  good.
The KV cache gets `utilization x total memory`, minus what is in use (weights, CUDA context, the
attention scratch), minus both peaks. Attention itself needs no memory that grows with context: the
Triton backend reads the cache in place and its split-K scratch is allocated up front for
`max_num_seqs` decodes. (The reference backend gathers each request's context into buffers sized by
batch x longest context; it is the correctness oracle, not for long runs on a GPU.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import SeqSlice
from .config import ModelConfig
from .kv_cache import PagedKVCache, dtype_size


@dataclass
class MemoryPlan:
    total_bytes: int
    in_use_bytes: int          # weights, CUDA context, scratch: in use before the KV cache
    step_peak_bytes: int       # activations of the largest flat batch (eager)
    graph_pool_bytes: int      # activations of the largest graph bucket (held by the graph pool)
    kv_tokens: int

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"GPU {self.total_bytes / gib:.1f} GiB: {self.in_use_bytes / gib:.1f} in use, worst step "
                f"{self.step_peak_bytes / gib:.2f}, graph pool {self.graph_pool_bytes / gib:.2f}, "
                f"KV cache {self.kv_tokens} tokens")


@torch.inference_mode()
def _peak_bytes(model, backend, config: ModelConfig, dtype, device, prefill_tokens: int, num_decodes: int,
                block_size: int, bucket: int | None = None) -> int:
    """Peak allocation above the current level while one batch (and its logits) runs on a throwaway cache."""
    prefill_blocks = -(-prefill_tokens // block_size)
    kv = PagedKVCache(config, prefill_blocks + num_decodes + 1, block_size, dtype, device)
    slices, ids, row = [], [], 0
    if prefill_tokens:
        slices.append(SeqSlice(0, prefill_tokens, prefill_tokens, list(range(prefill_blocks))))
        row = prefill_tokens
    for j in range(num_decodes):
        slices.append(SeqSlice(row + j, 1, 1, [prefill_blocks + j]))
    rows = bucket or row + num_decodes
    kw = {"layout": backend.bucket_layout(bucket)} if bucket else {}
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (rows,), device=device, generator=gen)
    positions = torch.zeros(rows, dtype=torch.long, device=device)
    if prefill_tokens:
        positions[:prefill_tokens] = torch.arange(prefill_tokens, device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    meta = backend.prepare(slices, num_decodes, block_size, device, **kw)
    hidden = model(ids, positions, kv, backend, meta)
    sample_rows = [s.q_start + s.q_len - 1 for s in slices]
    model.logits(hidden[torch.tensor(sample_rows, device=device)]).argmax(-1).tolist()
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, hidden, meta
    return peak


def plan_kv_cache(model, backend, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  utilization: float, max_batch_tokens: int, max_num_seqs: int, max_graph_rows: int,
                  block_size: int = 16) -> MemoryPlan:
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu memory utilization must be in (0, 1], got {utilization}")
    num_decodes = min(max_num_seqs, max_batch_tokens) - 1
    prefill = max(1, max_batch_tokens - num_decodes)
    step_peak = _peak_bytes(model, backend, config, dtype, device, prefill, num_decodes, block_size)
    graph_peak = 0
    if max_graph_rows:
        decodes = min(max_graph_rows, max_num_seqs) - 1
        graph_peak = _peak_bytes(model, backend, config, dtype, device, max_graph_rows - decodes, decodes,
                                 block_size, bucket=max_graph_rows)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = utilization * total - in_use - step_peak - graph_peak
    per_token = config.kv_bytes_per_token * dtype_size(dtype)
    tokens = int(budget // per_token) // block_size * block_size
    plan = MemoryPlan(total, in_use, step_peak, graph_peak, tokens)
    if tokens < block_size:
        raise ValueError(f"no room for a KV cache at gpu memory utilization {utilization}: {plan.describe()}")
    return plan
