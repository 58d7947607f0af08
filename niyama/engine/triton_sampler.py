"""The sampler's GPU kernels: penalties in place, and the draw, one program per row.

The algorithm and its reference are in sampler.py (`penalize_reference`, `draw_reference`); these
compute the same functions. The draw reads a row's logits once for greedy rows and for rows whose first
draw is kept (the pass that finds the row's maximum and softmax sum also makes round 0's draw), plus one
pass for the top-p test, and two more per rejected round. Noise is the same hash as sampler.py's, in
uint32 arithmetic. The safety bound's fallback is the row's top raw logit, the reference's top allowed
one: the same token, since the top token passes every filter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# A row is one program, so its passes run on one SM: many warps shorten them. Of five (block, warps) settings
# this was the fastest at batch 1, 128 and 256 on an H100 (benchmarks/sampler_bench.py's sweep; docs/sampling.md).
BLOCK = 4096
NUM_WARPS = 32


@triton.jit
def _mix32(x):
    # Wellons' lowbias32 on uint32 (Triton types a literal in [2^31, 2^32) as uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_keys(seed_lo, seed_hi, position, round_):
    k1 = _mix32(seed_lo ^ _mix32(position ^ (round_.to(tl.uint32) << 24)))
    k2 = _mix32(seed_hi ^ _mix32(k1 + 0x9E3779B9))
    return k1, k2


@triton.jit
def _gumbel(cols, k1, k2):
    h = _mix32(_mix32(cols.to(tl.uint32) ^ k1) ^ k2)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _first_max(best, pick):
    """The largest of a block of per-lane maxima, and the smallest token index that holds it (torch.argmax's
    tie rule): lanes keep their earliest maximum, so this is the first over the whole row."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, pick, 2147483647), 0)


@triton.jit
def _draw_round(base, vocab, t, floor_s, pivot, k1, k2, BLOCK: tl.constexpr):
    """Gumbel-max over the row's tokens with s = logit / t >= floor_s and s > pivot: (pick, its s)."""
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    pick = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s = tl.load(base + cols, mask=cols < vocab, other=float("-inf")) / t
        ok = (cols < vocab) & (s >= floor_s) & (s > pivot)
        score = tl.where(ok, s + _gumbel(cols, k1, k2), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        pick = tl.where(better, cols, pick)
    _, token = _first_max(best, pick)
    return token, tl.load(base + token) / t


@triton.jit
def _draw_kernel(logits, stride, vocab, temperature, top_p, min_p, floor, seed, position, out,
                 BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr):
    # Every pass keeps per-lane running values (max, softmax sum, best score) and reduces across lanes once
    # at its end: no block-wide reduction inside the loops.
    row = tl.program_id(0)
    base = logits + row.to(tl.int64) * stride
    t = tl.load(temperature + row)
    p = tl.load(top_p + row)
    sd = tl.load(seed + row)
    seed_lo = (sd & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = (sd >> 32).to(tl.uint32)
    pos = tl.load(position + row).to(tl.uint32)
    sampled = t > 0
    tt = tl.where(sampled, t, 1.0)
    floor_s = tl.load(floor + row) / tt
    k1, k2 = _row_keys(seed_lo, seed_hi, pos, tl.full((), 0, tl.int32))
    # one pass: the raw argmax (greedy rows, fallback), max and softmax sum of the allowed tokens, round 0
    top_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    top_i = tl.zeros((BLOCK,), tl.int32)
    m_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    z_v = tl.zeros((BLOCK,), tl.float32)
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    pick_v = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
        xn = tl.where(x == x, x, float("inf"))         # NaN counts as the largest, as torch.argmax has it
        better = xn > top_v
        top_v = tl.where(better, xn, top_v)
        top_i = tl.where(better, cols, top_i)
        if sampled:
            s = x / tt
            ok = (cols < vocab) & (s >= floor_s)
            sm = tl.where(ok, s, float("-inf"))
            new_m = tl.maximum(m_v, sm)
            ref = tl.where(new_m == float("-inf"), 0.0, new_m)      # no -inf - -inf: lanes still empty stay 0
            z_v = z_v * tl.exp(m_v - ref) + tl.exp(sm - ref)
            m_v = new_m
            score = tl.where(ok, s + _gumbel(cols, k1, k2), float("-inf"))
            better = score > best_v
            best_v = tl.where(better, score, best_v)
            pick_v = tl.where(better, cols, pick_v)
    _, token = _first_max(top_v, top_i)
    if sampled:
        m = tl.max(m_v, 0)
        z = tl.sum(z_v * tl.exp(m_v - tl.where(m == float("-inf"), 0.0, m)), 0)
        _, pick = _first_max(best_v, pick_v)
        usable = (m > float("-inf")) & (m < float("inf")) & (z > 0) & (z < float("inf"))
        if usable:
            mp = tl.load(min_p + row)
            minp_floor = tl.where(mp > 0, m + tl.log(tl.where(mp > 0, mp, 1.0)), float("-inf"))
            sp = tl.load(base + pick) / tt
            round_ = tl.full((), 0, tl.int32)
            searching = tl.full((), 1, tl.int1)
            while searching:
                accept = sp >= minp_floor
                if accept & (p < 1):
                    above = tl.zeros((BLOCK,), tl.float32)
                    for start in range(0, vocab, BLOCK):
                        cols = start + tl.arange(0, BLOCK)
                        s = tl.load(base + cols, mask=cols < vocab, other=float("-inf")) / tt
                        ok = (cols < vocab) & (s >= floor_s) & (s > sp)
                        above += tl.where(ok, tl.exp(s - m), 0.0)
                    mass = tl.sum(above, 0)
                    accept = (mass <= 0) | (mass < p * z)
                if accept:
                    token = pick
                    searching = tl.full((), 0, tl.int1)
                else:
                    round_ += 1
                    if round_ >= MAX_ROUNDS:        # the safety bound: the top allowed token is always kept
                        searching = tl.full((), 0, tl.int1)
                    else:
                        k1, k2 = _row_keys(seed_lo, seed_hi, pos, round_)
                        pick, sp = _draw_round(base, vocab, tt, floor_s, sp, k1, k2, BLOCK)
    tl.store(out + row, token.to(tl.int64))


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
         floor: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, max_rounds: int, block: int = BLOCK,
         num_warps: int = NUM_WARPS) -> torch.Tensor:
    """`sampler.draw_reference` as one kernel launch (no host wait); `max_rounds`: sampler.MAX_ROUNDS."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        _draw_kernel[(n,)](logits, logits.stride(0), vocab, temperature.contiguous(), top_p.contiguous(),
                           min_p.contiguous(), floor.contiguous(), seed.contiguous(), position.contiguous(), out,
                           BLOCK=block, MAX_ROUNDS=max_rounds, num_warps=num_warps)
    return out


@triton.jit
def _penalize_kernel(logits, stride, vocab, rows, floats, ints, counts, prompt, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows + i)
    slot = tl.load(ints + row * 4 + 3)
    rep = tl.load(floats + row * 6 + 3)
    presence = tl.load(floats + row * 6 + 4)
    frequency = tl.load(floats + row * 6 + 5)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < vocab
    ptr = logits + row * stride + cols
    x = tl.load(ptr, mask=ok, other=0.0)
    c = tl.load(counts + slot * vocab + cols, mask=ok, other=0)
    seen = (tl.load(prompt + slot * vocab + cols, mask=ok, other=0) != 0) | (c > 0)
    x = tl.where(seen, tl.where(x < 0, x * rep, x / rep), x)       # exact when rep is 1
    x = x - frequency * c.to(tl.float32) - presence * (c > 0).to(tl.float32)
    tl.store(ptr, x, mask=ok)


def penalize(logits: torch.Tensor, rows: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor, state) -> None:
    """`sampler.penalize_reference` in place on `logits[rows]`, one launch."""
    n, vocab = rows.numel(), logits.shape[1]
    if n:
        _penalize_kernel[(n, triton.cdiv(vocab, BLOCK))](
            logits, logits.stride(0), vocab, rows, floats.contiguous(), ints.contiguous(), state.counts,
            state.prompt.view(torch.uint8), BLOCK=BLOCK, num_warps=8)
