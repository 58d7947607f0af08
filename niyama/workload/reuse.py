"""How much of each prompt a prefix cache could serve, from a workload's prefix block ids alone (no scheduling,
no deadlines): the ceilings the simulated and real caches are measured against, and what `niyama bound`
counts as prefill work.

The requests are taken in order; each finds the longest run of its leading blocks in the cache (never its
last token: that token is always computed), then puts all its blocks there. The cache holds `kv_tokens` of
blocks (None: unbounded) and evicts by
- `belady`: the block whose next use is farthest (knows the future: no server can do better with that
  memory, so it bounds the hit rate of any eviction rule);
- `lru`: the least recently used.
Blocks are the trace's (512 tokens); running requests holding blocks are not modelled (they only lower what a
real cache can keep).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

from ..kv import chained
from .build import RequestSpec

NEVER = 1 << 62


def cached_prefixes(specs: list[RequestSpec], block_tokens: int, kv_tokens: int | None = None,
                    eviction: str = "belady", block_size: int = 16) -> np.ndarray:
    """Per request, the prompt tokens a cache of `kv_tokens` (None: unbounded) would serve; 0 without ids."""
    if eviction not in ("belady", "lru"):
        raise ValueError(f"eviction must be belady or lru, got {eviction!r}")
    chains = [chained(s.block_ids or ()) for s in specs]
    cap = None if kv_tokens is None else max(0, kv_tokens // block_tokens)
    uses = _next_uses(chains) if eviction == "belady" and cap is not None else None
    cache: dict = OrderedDict() if eviction == "lru" else {}
    heap: list = []
    out = np.zeros(len(specs), dtype=np.int64)
    for i, (chain, spec) in enumerate(zip(chains, specs)):
        k = 0
        while k < len(chain) and chain[k] in cache:
            k += 1
        out[i] = min(k * block_tokens, (spec.num_prompt_tokens - 1) // block_size * block_size)
        for j, key in enumerate(chain):
            if uses is not None:
                cache[key] = uses[i][j]
                heapq.heappush(heap, (-uses[i][j], key))
            else:
                cache[key] = None
                if eviction == "lru":
                    cache.move_to_end(key)
        while cap is not None and len(cache) > cap:
            if eviction == "lru":
                cache.popitem(last=False)
            else:
                neg, key = heapq.heappop(heap)
                if cache.get(key) == -neg:          # (an older entry of a block used again since)
                    del cache[key]
    return out


def _next_uses(chains: list[list[int]]) -> list[list[int]]:
    """For each request's blocks, the index of the next request that uses the block (NEVER if none)."""
    nxt: dict = {}
    uses: list = [None] * len(chains)
    for i in range(len(chains) - 1, -1, -1):
        uses[i] = [nxt.get(key, NEVER) for key in chains[i]]
        for key in chains[i]:
            nxt[key] = i
    return uses
