"""Triton kernels for attention over the paged KV cache, read in place.

Layout (kv_cache.py): a layer's K (and V) cache is `[blocks, block_size, kv_heads, head_dim]`;
token p of a request lives in block `table[p // block_size]` at offset `p % block_size`. No kernel
copies a request's blocks anywhere: every K/V tile is loaded straight from its blocks.

- `write_kv`: the step's new K/V rows into their cache slots (a negative slot is skipped: padding).
- `prefill_attention`: one program per (tile of BLOCK_M query rows of one prefill chunk, query
  head). The chunk's queries sit at positions `context - q_len ...`; keys before the tile's first
  position are visible to every row (loop 1, no mask), the rest need the causal mask (loop 2).
- `decode_attention`: one program per (decode, KV head, split). The GROUP query heads that share a
  KV head are the rows of one tile, so each K/V tile is read once for all of them; the context is
  cut into NUM_SPLITS ranges (split-K, flash-decoding) so that a small batch still fills the GPU,
  and `combine_splits` merges the partial softmaxes.
Softmax runs in float32 with exp2 (the scale is pre-multiplied by log2 e).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv(k_ptr, v_ptr, k_cache, v_cache, slots,
             stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
             NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        mask = h < NUM_KV_HEADS
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + h * stride_ch + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache + dst, k, mask=mask)
        tl.store(v_cache + dst, v, mask=mask)


@triton.jit
def _kv_offsets(table, n, limit, stride_cb, stride_ct, kv_off, BLOCK_SIZE: tl.constexpr):
    """Element offsets of key positions `n` (masked to `< limit`) inside the paged cache."""
    blk = tl.load(table + n // BLOCK_SIZE, mask=n < limit, other=0).to(tl.int64)
    return blk * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_off


@triton.jit
def _softmax_step(qk, v, m_i, l_i, acc):
    """Fold one tile of scores `qk` (log2 units) and its values `v` into the running (max, sum, output)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit(do_not_specialize=["table_stride"])    # one compiled kernel for every table width
def prefill_attention(q_ptr, k_cache, v_cache, out_ptr,
                      tile_seq, tile_m0, seq_q_start, seq_q_len, seq_ctx, tables, table_stride,
                      scale_log2,
                      stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.load(tile_seq + tile)
    if s < 0:                                # an unused tile of a fixed-size (CUDA graph) grid
        return
    m0 = tl.load(tile_m0 + tile)
    q_start = tl.load(seq_q_start + s)
    q_len = tl.load(seq_q_len + s)
    ctx = tl.load(seq_ctx + s)
    first = ctx - q_len                      # position of the chunk's first query
    table = tables + s.to(tl.int64) * table_stride
    kv_off = (head // GROUP) * stride_ch

    m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_ok = m < q_len
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = first + m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # loop 1: keys before the tile's first query position, seen by every row of the tile
    full_end = (first + m0) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        off = _kv_offsets(table, n, full_end, stride_cb, stride_ct, kv_off, BLOCK_SIZE)
        k = tl.load(k_cache + off[None, :] + d[:, None])                       # [HEAD_DIM, BLOCK_N]
        v = tl.load(v_cache + off[:, None] + d[None, :])                       # [BLOCK_N, HEAD_DIM]
        m_i, l_i, acc = _softmax_step(tl.dot(q, k) * scale_log2, v, m_i, l_i, acc)

    # loop 2: the diagonal band, causal mask (a row's first key here is always visible: no -inf rows)
    end = tl.minimum(ctx, first + m0 + BLOCK_M)
    for start in range(full_end, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        off = _kv_offsets(table, n, end, stride_cb, stride_ct, kv_off, BLOCK_SIZE)
        n_ok = n < end
        k = tl.load(k_cache + off[None, :] + d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(v_cache + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        qk = tl.where(visible, tl.dot(q, k) * scale_log2, float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["table_stride"])
def decode_attention(q_ptr, k_cache, v_cache, part_acc, part_ml, out_ptr,
                     tables, table_stride, ctx_lens, row0_ptr, scale_log2,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Partial attention of decode b, KV head kvh, over split `split` of its context, into
    part_acc `[B, heads, NUM_SPLITS, HEAD_DIM]` (unnormalised) and part_ml `[B, heads, NUM_SPLITS, 2]`
    (max, sum); with one split, the normalised output straight into out. Decode b's query and output
    row is `row0 + b` (row0 read from the device: in a CUDA graph the prefill rows before it vary);
    a decode of context 0 is an unused slot of a fixed-size grid."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_lens + b)
    if ctx == 0:
        return
    row = tl.load(row0_ptr).to(tl.int64) + b
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)
    table = tables + b.to(tl.int64) * table_stride
    kv_off = kvh * stride_ch

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        off = _kv_offsets(table, n, hi, stride_cb, stride_ct, kv_off, BLOCK_SIZE)
        k = tl.load(k_cache + off[None, :] + d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(v_cache + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
        qk = tl.where(n_ok[None, :], tl.dot(q, k) * scale_log2, float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc)

    if NUM_SPLITS == 1:
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        return
    base = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split     # [GROUP_PAD]
    tl.store(part_acc + base[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_ml + base * 2, m_i, mask=g_ok)
    tl.store(part_ml + base * 2 + 1, l_i, mask=g_ok)


@triton.jit
def combine_splits(part_acc, part_ml, out_ptr, ctx_lens, row0_ptr, stride_ot, stride_oh,
                   HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """out[row0 + b, head] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits (M = max m_s);
    an empty split has m = -inf, l = 0 and weighs nothing."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(ctx_lens + b) == 0:
        return
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    base = (b.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + s
    m = tl.load(part_ml + base * 2)
    l_s = tl.load(part_ml + base * 2 + 1)
    w = tl.exp2(m - tl.max(m, 0))
    acc = tl.load(part_acc + base[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    row = tl.load(row0_ptr).to(tl.int64) + b
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))
