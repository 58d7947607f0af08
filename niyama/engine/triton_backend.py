"""`TritonPaged`: the GPU attention backend, reading the paged KV cache in place.

Per step, `prepare` packs every integer the kernels need (slot of each new token, prefill tiles,
block tables, context lengths) into one int32 array and copies it to the device once; each layer's
`forward` then launches `write_kv`, `prefill_attention` over the prefill rows and
`decode_attention` + `combine_splits` over the decode rows (triton_attention.py). The decode
split-K scratch is allocated once, for the largest batch (`max_num_seqs`), so attention needs no
memory that grows with batch x context.

A decode-only step may run with its batch padded to a bucket size (`pad_to`): the padding rows write
nowhere (slot -1) and attend to one cached token of block 0. CUDA graphs are captured at the bucket
sizes, and the eager path pads the same way, so both run identical kernels on identical shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton

from .attention import SeqSlice
from .triton_attention import combine_splits, decode_attention, prefill_attention, write_kv

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
DENSE_MIN_TOKENS = 256   # a prompt's first chunk this long or longer may run on cuDNN's attention (below)


@dataclass
class PagedMeta:
    slots: torch.Tensor               # [T] cache slot of each new token (-1: padding, not written)
    num_prefill_rows: int
    tile_seq: torch.Tensor            # [tiles] prefill slice of each BLOCK_M tile of query rows
    tile_m0: torch.Tensor             # [tiles] first row of the tile within its slice
    seq_q_start: torch.Tensor         # [P] per prefill slice: first row, query rows, context after the step
    seq_q_len: torch.Tensor
    seq_ctx: torch.Tensor
    prefill_tables: torch.Tensor      # [P, width] block ids
    block_m: int
    num_decodes: int                  # decode rows (padding included) after the prefill rows
    decode_tables: torch.Tensor       # [B, width]
    decode_ctx: torch.Tensor          # [B]
    num_splits: int
    dense: tuple[tuple[int, int], ...] = ()   # (first row, rows) of prefill chunks with no cached context


class TritonPaged:
    name = "triton"

    def __init__(self, config, device: torch.device, max_num_seqs: int, block_size: int):
        if config.head_dim & (config.head_dim - 1):
            raise ValueError(f"the triton backend needs a power-of-two head_dim, not {config.head_dim}")
        self.group = config.num_heads // config.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.block_size = block_size
        self.max_blocks = -(-config.max_position // block_size)      # width of a block table row
        self.device = device
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self.target_programs = 2 * sms
        worst = max(b * self.num_splits(b) for b in range(1, max_num_seqs + 1))
        self.part_acc = torch.empty(worst * self.num_heads * self.head_dim, dtype=torch.float32, device=device)
        self.part_ml = torch.empty(worst * self.num_heads * 2, dtype=torch.float32, device=device)
        self.scale_log2 = LOG2E / math.sqrt(config.head_dim)
        self._tables: dict[int, tuple[list, np.ndarray]] = {}
        self.dense = device.type == "cuda" and self._probe_dense(config)
        # launch settings (benchmarks/attention_bench.py times the alternatives)
        self.prefill_launch = {128: dict(BLOCK_N=128, num_warps=8, num_stages=2),
                               64: dict(BLOCK_N=64, num_warps=4, num_stages=2),
                               16: dict(BLOCK_N=64, num_warps=4, num_stages=2)}
        self.decode_launch = dict(BLOCK_N=64, num_warps=4, num_stages=2)

    def num_splits(self, batch: int) -> int:
        """Splits of each decode's context: enough programs to fill the GPU twice, a power of two."""
        want = -(-self.target_programs // (max(1, batch) * self.num_kv_heads))
        return min(MAX_SPLITS, triton.next_power_of_2(want))

    # --- per step ------------------------------------------------------------
    def prepare(self, seqs: list[SeqSlice], num_decodes: int, block_size: int, device: torch.device,
                pad_to: int | None = None) -> PagedMeta:
        num_prefills = len(seqs) - num_decodes
        prefills, decodes = seqs[:num_prefills], seqs[num_prefills:]
        num_prefill_rows = sum(s.q_len for s in prefills)
        batch = pad_to or num_decodes
        dense = tuple((s.q_start, s.q_len) for s in prefills
                      if self.dense and s.q_len == s.context_len and s.q_len >= DENSE_MIN_TOKENS)
        paged = [i for i, s in enumerate(prefills) if (s.q_start, s.q_len) not in dense]
        paged_rows = sum(prefills[i].q_len for i in paged)
        block_m = 16 if max((prefills[i].q_len for i in paged), default=0) <= 16 else 64 if paged_rows <= 512 else 128
        tiles = [(i, m0) for i in paged for m0 in range(0, prefills[i].q_len, block_m)]
        width = max((-(-s.context_len // block_size) for s in seqs), default=1)
        rows = num_prefill_rows + batch
        sizes = (rows, len(tiles), len(tiles), num_prefills, num_prefills, num_prefills,
                 num_prefills * width, batch * width, batch)
        buf = np.zeros(sum(sizes), dtype=np.int32)
        parts = np.split(buf, np.cumsum(sizes)[:-1])
        slots, tile_seq, tile_m0, q_start, q_len, ctx, p_tables, d_tables, d_ctx = parts
        p_tables, d_tables = p_tables.reshape(num_prefills, width), d_tables.reshape(batch, width)
        for i, s in enumerate(prefills):
            blocks = self._table(s.block_ids)
            first = s.context_len - s.q_len
            pos = np.arange(first, s.context_len)
            slots[s.q_start:s.q_start + s.q_len] = blocks[pos // block_size] * block_size + pos % block_size
            q_start[i], q_len[i], ctx[i] = s.q_start, s.q_len, s.context_len
            n = min(len(blocks), width)
            p_tables[i, :n] = blocks[:n]
        if tiles:
            tile_seq[:], tile_m0[:] = zip(*tiles)
        slots[num_prefill_rows:] = -1
        d_ctx[:] = 1
        for j, s in enumerate(decodes):
            blocks = self._table(s.block_ids)
            p = s.context_len - 1
            slots[num_prefill_rows + j] = blocks[p // block_size] * block_size + p % block_size
            n = min(len(blocks), width)
            d_tables[j, :n] = blocks[:n]
            d_ctx[j] = s.context_len
        self._forget_unused(seqs)
        dev = torch.from_numpy(buf).to(device, non_blocking=True)
        dslots, dtile_seq, dtile_m0, dq_start, dq_len, dctx, dp_tables, dd_tables, dd_ctx = torch.split(dev, sizes)
        return PagedMeta(dslots, num_prefill_rows, dtile_seq, dtile_m0, dq_start, dq_len, dctx,
                         dp_tables.view(num_prefills, width), block_m, batch, dd_tables.view(batch, width), dd_ctx,
                         self.num_splits(batch), dense)

    def _table(self, block_ids: list[int]) -> np.ndarray:
        """The request's block ids as an int32 array, converted once and extended as the request grows.
        Keyed by the list object: the allocator replaces a request's list when it frees its blocks."""
        hit = self._tables.get(id(block_ids))
        if hit is not None and hit[0] is block_ids:
            lst, arr = hit
            if len(arr) == len(lst):
                return arr
            arr = np.concatenate([arr, np.asarray(lst[len(arr):], dtype=np.int32)])
        else:
            arr = np.asarray(block_ids, dtype=np.int32)
        self._tables[id(block_ids)] = (block_ids, arr)
        return arr

    def _forget_unused(self, seqs: list[SeqSlice]) -> None:
        if len(self._tables) > 2 * len(seqs) + 64:
            live = {id(s.block_ids) for s in seqs}
            self._tables = {k: v for k, v in self._tables.items() if k in live}

    # --- prompts' first chunks: cuDNN ------------------------------------------
    # A chunk with no cached context needs no paging: its keys are its own rows. cuDNN's fused
    # attention ran such chunks 1.6-1.8x faster than the Triton kernel on the H100 (attention_bench:
    # 8192 tokens 0.96 vs 1.53 ms a layer), so it takes them where the probe below finds it working.
    def _dense_attention(self, q, k, v) -> torch.Tensor:
        """Causal attention of one chunk over itself; q `[n, H, D]`, k/v `[n, KVH, D]` -> `[n, H, D]`."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))        # [1, heads, n, D]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True,
                                                                   enable_gqa=self.group > 1)
        return out[0].transpose(0, 1)

    def _probe_dense(self, config) -> bool:
        """Whether cuDNN attention runs here on strided GQA inputs and matches plain math."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        n, h, kvh, d = 300, self.num_heads, self.num_kv_heads, self.head_dim
        qkv = torch.randn(n, (h + 2 * kvh) * d, generator=gen, device=self.device, dtype=torch.bfloat16)
        q, k, v = qkv[:, :h * d].view(n, h, d), qkv[:, h * d:(h + kvh) * d].view(n, kvh, d), qkv[:, (h + kvh) * d:].view(n, kvh, d)
        try:
            got = self._dense_attention(q, k, v)
        except RuntimeError:
            return False
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(0, 1), k.float().transpose(0, 1).repeat_interleave(self.group, 0),
            v.float().transpose(0, 1).repeat_interleave(self.group, 0), is_causal=True).transpose(0, 1)
        return bool(((got.float() - ref).norm() / ref.norm()) < 2e-2)

    # --- per layer -----------------------------------------------------------
    def forward(self, q, k, v, k_cache, v_cache, meta: PagedMeta) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, KVH, D]` (strided views are fine), caches `[blocks, 16, KVH, D]` -> `[T, H, D]`."""
        t = q.shape[0]
        d = self.head_dim
        cb, ct, ch = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
        write_kv[(t,)](k, v, k_cache, v_cache, meta.slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       cb, ct, ch, NUM_KV_HEADS=self.num_kv_heads,
                       HEADS_PAD=triton.next_power_of_2(self.num_kv_heads), HEAD_DIM=d,
                       BLOCK_SIZE=self.block_size, num_warps=4)
        out = q.new_empty((t, self.num_heads, d))
        for r0, n in meta.dense:
            out[r0:r0 + n] = self._dense_attention(q[r0:r0 + n], k[r0:r0 + n], v[r0:r0 + n])
        tiles = meta.tile_seq.shape[0]
        if tiles:
            prefill_attention[(tiles, self.num_heads)](
                q, k_cache, v_cache, out, meta.tile_seq, meta.tile_m0, meta.seq_q_start, meta.seq_q_len,
                meta.seq_ctx, meta.prefill_tables, meta.prefill_tables.stride(0), self.scale_log2,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), cb, ct, ch,
                GROUP=self.group, HEAD_DIM=d, BLOCK_SIZE=self.block_size, BLOCK_M=meta.block_m,
                **self.prefill_launch[meta.block_m])
        if meta.num_decodes:
            b, splits, r0 = meta.num_decodes, meta.num_splits, meta.num_prefill_rows
            qd, od = q[r0:], out[r0:]
            part_acc = self.part_acc[:b * self.num_heads * splits * d]
            part_ml = self.part_ml[:b * self.num_heads * splits * 2]
            decode_attention[(b, self.num_kv_heads, splits)](
                qd, k_cache, v_cache, part_acc, part_ml, od, meta.decode_tables, meta.decode_tables.stride(0),
                meta.decode_ctx, self.scale_log2, qd.stride(0), qd.stride(1), od.stride(0), od.stride(1), cb, ct, ch,
                GROUP=self.group, GROUP_PAD=max(16, triton.next_power_of_2(self.group)), HEAD_DIM=d,
                BLOCK_SIZE=self.block_size, NUM_SPLITS=splits, **self.decode_launch)
            if splits > 1:
                combine_splits[(b, self.num_heads)](part_acc, part_ml, od, od.stride(0), od.stride(1),
                                                    HEAD_DIM=d, NUM_SPLITS=splits, num_warps=4)
        return out
