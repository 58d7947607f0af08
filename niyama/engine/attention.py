"""Attention over the paged KV cache, behind a small backend interface.

The runner describes a step as one `SeqSlice` per request in the flat batch
(prefill chunks first, then one token per decode). A backend turns that into
its metadata once per step (`prepare`), then each layer calls `forward`,
which writes the new K/V into the cache and attends over each request's
whole context. `TorchReference` is plain PyTorch, runs on CPU and GPU, and is
the correctness oracle for faster backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class SeqSlice:
    q_start: int            # first row of this request in the flat batch
    q_len: int              # query tokens this step (1 for a decode)
    context_len: int        # tokens in the KV cache once this step wrote its own
    block_ids: list[int]    # the request's KV blocks, in position order

    @property
    def first_position(self) -> int:
        return self.context_len - self.q_len


class AttentionBackend(Protocol):
    name: str

    def prepare(self, seqs: list[SeqSlice], num_decodes: int, block_size: int, device: torch.device) -> Any:
        """Per-step metadata shared by every layer; the last `num_decodes` slices are decodes.
        (The triton backend also takes a `layout`: the padded capacities of a CUDA-graph bucket.)"""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: Any) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, KVH, D]`, caches `[blocks, block_size, KVH, D]` -> `[T, H, D]`."""


@dataclass
class _Prefill:
    rows: slice
    block_table: torch.Tensor   # [blocks]
    context_len: int
    mask: torch.Tensor          # [q_len, context_len] bool, True = attend
    k: torch.Tensor | None = None   # gather buffers: made by the first layer, reused by the others
    v: torch.Tensor | None = None


@dataclass
class _Decodes:
    rows: slice
    block_table: torch.Tensor   # [B * max_blocks]: each decode's blocks padded with block 0, flattened
    num_decodes: int
    mask: torch.Tensor          # [B, 1, 1, max_blocks * block_size]
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class ReferenceMeta:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    prefills: list[_Prefill]
    decodes: _Decodes | None


class TorchReference:
    """Gathers each request's K/V blocks and runs `scaled_dot_product_attention`:
    one call per prefill chunk (causal within the chunk, full over earlier
    context), one padded call for all decodes."""

    name = "torch-reference"

    def prepare(self, seqs: list[SeqSlice], num_decodes: int, block_size: int, device: torch.device) -> ReferenceMeta:
        slots = []
        for s in seqs:
            for p in range(s.first_position, s.context_len):
                slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        num_prefills = len(seqs) - num_decodes
        prefills = []
        for s in seqs[:num_prefills]:
            nb = -(-s.context_len // block_size)
            q_pos = torch.arange(s.first_position, s.context_len, device=device)
            k_pos = torch.arange(s.context_len, device=device)
            prefills.append(_Prefill(slice(s.q_start, s.q_start + s.q_len),
                                     torch.tensor(s.block_ids[:nb], dtype=torch.long, device=device),
                                     s.context_len, k_pos[None, :] <= q_pos[:, None]))
        decodes = None
        if num_decodes:
            dec = seqs[num_prefills:]
            max_nb = max(-(-s.context_len // block_size) for s in dec)
            table = [s.block_ids[:max_nb] + [0] * (max_nb - len(s.block_ids[:max_nb])) for s in dec]
            lens = torch.tensor([s.context_len for s in dec], device=device)
            mask = torch.arange(max_nb * block_size, device=device)[None, :] < lens[:, None]
            decodes = _Decodes(slice(dec[0].q_start, dec[0].q_start + num_decodes),
                               torch.tensor(table, dtype=torch.long, device=device).flatten(), num_decodes,
                               mask[:, None, None, :])
        return ReferenceMeta(slot_mapping, prefills, decodes)

    def forward(self, q, k, v, k_cache, v_cache, meta: ReferenceMeta) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for p in meta.prefills:
            p.k, p.v = _gather(k_cache, v_cache, p.block_table, p.k, p.v)
            kc = p.k.flatten(0, 1)[:p.context_len]                          # [ctx, KVH, D]
            vc = p.v.flatten(0, 1)[:p.context_len]
            out[p.rows] = _sdpa(q[p.rows].transpose(0, 1), kc.transpose(0, 1), vc.transpose(0, 1),
                                p.mask).transpose(0, 1)
        d = meta.decodes
        if d is not None:
            d.k, d.v = _gather(k_cache, v_cache, d.block_table, d.k, d.v)
            kc = d.k.view(d.num_decodes, -1, num_kv_heads, head_dim)        # [B, ctx, KVH, D]
            vc = d.v.view(d.num_decodes, -1, num_kv_heads, head_dim)
            out[d.rows] = _sdpa(q[d.rows].unsqueeze(2), kc.transpose(1, 2), vc.transpose(1, 2),
                                d.mask).squeeze(2)
        return out


def _gather(k_cache, v_cache, blocks, k_buf, v_buf):
    """Copy `blocks` of both caches into buffers that every layer of the step reuses (a fresh tensor per
    layer costs an allocation, and on CPU page faults, each time: ~3x slower gathers measured)."""
    if k_buf is None:
        k_buf = k_cache.new_empty((len(blocks),) + k_cache.shape[1:])
        v_buf = torch.empty_like(k_buf)
    torch.index_select(k_cache, 0, blocks, out=k_buf)
    torch.index_select(v_cache, 0, blocks, out=v_buf)
    return k_buf, v_buf


def _sdpa(q, k, v, mask) -> torch.Tensor:
    """Grouped-query attention: each KV head serves heads/kv_heads query heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[-3] != k.shape[-3])
