"""Token ids for a trace request, which carries lengths (and maybe prefix block ids), not text.

Without block ids a prompt is random ids from the request's own stream. With them (Mooncake's `hash_ids`)
each block id becomes one fixed run of `block_tokens` ids, drawn from a generator seeded by the id, so that
equal ids give equal tokens everywhere and a real engine or server sees the trace's prefix reuse. The prompt
is the runs of its ids, cut to its length (the last block is usually partial).
"""

from __future__ import annotations

import numpy as np

from .build import RequestSpec


def prompt_ids(spec: RequestSpec, num_tokens: int, vocab: tuple[int, int], rng: np.random.Generator,
               block_tokens: int = 512, seed: int = 0) -> list[int]:
    """`num_tokens` ids in [vocab[0], vocab[1]) for `spec` (its length cut to `num_tokens` by the caller);
    `rng` draws a prompt without block ids; `seed` varies every block's ids together."""
    if not spec.block_ids:
        return rng.integers(vocab[0], vocab[1], num_tokens).tolist()
    need = -(-num_tokens // block_tokens)
    if need > len(spec.block_ids):
        raise ValueError(f"{num_tokens} tokens need {need} block ids, the request has {len(spec.block_ids)}")
    runs = [np.random.default_rng((seed, h)).integers(vocab[0], vocab[1], block_tokens) for h in spec.block_ids[:need]]
    return np.concatenate(runs)[:num_tokens].tolist()
