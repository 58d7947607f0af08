"""`TritonPaged`: the GPU attention backend, reading the paged KV cache in place.

Each step's integers (token ids, positions, the KV slot of each new token, the rows to sample, prefill
tiles, block tables, context lengths) are packed into one int32 array by `pack` and reach the device
in one copy; `meta` cuts the device copy into named views. Each layer's `forward` then launches
`write_kv`, `prefill_attention` over the prefill rows and `decode_attention` (+ `combine_splits` when
the context is split) over the decode rows (triton_attention.py).

A `Layout` gives the capacity of every section. An eager step of any size gets an exact layout. A step
of at most `max_graph_rows` tokens gets the layout of its bucket (cuda_graphs.py): padded rows write
no KV (slot -1), unused tiles and decode slots are marked (-1, context 0) and their programs exit at
once, and the decode rows start at a row read from the device. So one CUDA graph per bucket size runs
any mix of prefill chunks and decodes that fits it, and the eager path runs the same padded shapes
when graphs are off (identical results). The split-K scratch is allocated once for the largest batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton

from .attention import SeqSlice
from .triton_attention import combine_splits, decode_attention, prefill_attention, write_kv

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
DENSE_MIN_TOKENS = 256     # a prompt's first chunk this long or longer may run on cuDNN's attention (below)
DENSE_PAD = 256            # ... padded to a multiple of this: cuDNN plans one kernel per length, once
GRAPH_BLOCK_M = (64, 128)  # prefill tile height inside bucket layouts: below 512 rows, and from 512 up
MAX_GRAPH_PREFILLS = 8     # prefill chunks a bucket layout holds; a step with more runs eagerly
SECTION_ALIGN = 16         # int32 elements: each section of a packed step starts 64-byte aligned


@dataclass(frozen=True)
class Layout:
    rows: int          # tokens in the flat batch, padding included
    prefills: int      # prefill chunks
    tiles: int         # BLOCK_M tiles of prefill query rows (the prefill kernel's grid)
    decodes: int       # decode slots (the decode kernel's grid)
    width: int         # block-table columns
    block_m: int
    num_splits: int
    dense: bool        # prompts' first chunks may go to cuDNN (eager layouts only)

    @property
    def sections(self) -> dict[str, int]:
        r, p, t, d, w = self.rows, self.prefills, self.tiles, self.decodes, self.width
        return {"ids": r, "positions": r, "slots": r, "sample_rows": r, "tile_seq": t, "tile_m0": t,
                "q_start": p, "q_len": p, "ctx": p, "p_tables": p * w, "d_tables": d * w, "d_ctx": d, "row0": 1}

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """(start, length) of each section. Starts are multiples of SECTION_ALIGN: Triton compiles a kernel
        variant per pointer alignment (16 bytes or not), so unaligned sections would compile new variants
        mid-run for the odd sizes of exact layouts (seen: ~20 compiles, seconds of stall, on a fresh H100)."""
        out, at = {}, 0
        for name, n in self.sections.items():
            out[name] = (at, n)
            at += -(-n // SECTION_ALIGN) * SECTION_ALIGN
        return out

    @property
    def size(self) -> int:
        start, n = self.offsets["row0"]
        return start + n


@dataclass
class PagedMeta:
    slots: torch.Tensor               # [rows] cache slot of each new token (-1: padding, not written)
    tile_seq: torch.Tensor            # [tiles] prefill chunk of each BLOCK_M tile of query rows (-1: unused)
    tile_m0: torch.Tensor             # [tiles] first row of the tile within its chunk
    seq_q_start: torch.Tensor         # [P] per prefill chunk: first row, query rows, context after the step
    seq_q_len: torch.Tensor
    seq_ctx: torch.Tensor
    prefill_tables: torch.Tensor      # [P, width] block ids
    decode_tables: torch.Tensor       # [D, width]
    decode_ctx: torch.Tensor          # [D] (0: unused slot)
    row0: torch.Tensor                # [1] first decode row
    layout: Layout
    dense: tuple[tuple[int, int], ...] = ()   # (first row, rows) of chunks that go to cuDNN


class TritonPaged:
    name = "triton"

    def __init__(self, config, device: torch.device, max_num_seqs: int, block_size: int):
        if config.head_dim & (config.head_dim - 1):
            raise ValueError(f"the triton backend needs a power-of-two head_dim, not {config.head_dim}")
        self.group = config.num_heads // config.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks = -(-config.max_position // block_size)      # width of a full block-table row
        self.device = device
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self.target_programs = 2 * sms
        worst = max(b * self.num_splits(b) for b in range(1, max_num_seqs + 1))
        self.part_acc = torch.empty(worst * self.num_heads * self.head_dim, dtype=torch.float32, device=device)
        self.part_ml = torch.empty(worst * self.num_heads * 2, dtype=torch.float32, device=device)
        self.scale_log2 = LOG2E / math.sqrt(config.head_dim)
        self._tables: dict[int, tuple[list, np.ndarray]] = {}
        # launch settings (benchmarks/attention_bench.py times the alternatives)
        self.prefill_launch = {128: dict(BLOCK_N=128, num_warps=8, num_stages=2),
                               64: dict(BLOCK_N=64, num_warps=4, num_stages=2),
                               16: dict(BLOCK_N=64, num_warps=4, num_stages=2)}
        self.decode_launch = dict(BLOCK_N=64, num_warps=4, num_stages=2)
        self.dense = device.type == "cuda" and self._probe_dense()

    def num_splits(self, batch: int) -> int:
        """Splits of each decode's context: enough programs to fill the GPU twice, a power of two."""
        want = -(-self.target_programs // (max(1, batch) * self.num_kv_heads))
        return min(MAX_SPLITS, triton.next_power_of_2(want))

    # --- layouts ---------------------------------------------------------------
    def exact_layout(self, seqs: list[SeqSlice], num_decodes: int) -> Layout:
        prefills = seqs[:len(seqs) - num_decodes]
        longest = max((s.q_len for s in prefills), default=0)
        rows = sum(s.q_len for s in prefills)
        block_m = 16 if longest <= 16 else 64 if rows <= 512 else 128
        tiles = sum(-(-s.q_len // block_m) for s in prefills)
        width = max((-(-s.context_len // self.block_size) for s in seqs), default=1)
        return Layout(rows + num_decodes, len(prefills), tiles, num_decodes, width, block_m,
                      self.num_splits(num_decodes), self.dense)

    def bucket_layout(self, rows: int) -> Layout:
        """The fixed layout of a CUDA-graph bucket of `rows` tokens: any mix of chunks and decodes that fits."""
        prefills = min(rows, MAX_GRAPH_PREFILLS)
        decodes = min(rows, self.max_num_seqs)
        # engine_profile on the H100: 64-row tiles ran a 768-token chunk after 2,400 cached tokens at 225
        # TFLOP/s, 128-row tiles a 2,048-token one at 299 (fewer re-reads of each K/V tile)
        block_m = GRAPH_BLOCK_M[rows >= 512]
        return Layout(rows, prefills, -(-rows // block_m) + prefills, decodes, self.max_blocks, block_m,
                      self.num_splits(decodes), False)

    @staticmethod
    def fits(layout: Layout, num_rows: int, num_prefills: int, num_decodes: int) -> bool:
        return num_rows <= layout.rows and num_prefills <= layout.prefills and num_decodes <= layout.decodes

    # --- per step --------------------------------------------------------------
    def pack(self, seqs: list[SeqSlice], num_decodes: int, ids: list[int], positions: list[int],
             sample_rows: list[int], layout: Layout, buf: np.ndarray) -> tuple[tuple[int, int], ...]:
        """Write the step into `buf` (int32, at least `layout.size`); return the chunks that go to cuDNN."""
        bs = self.block_size
        v = {name: buf[start:start + n] for name, (start, n) in layout.offsets.items()}
        num_prefills = len(seqs) - num_decodes
        prefills, decodes = seqs[:num_prefills], seqs[num_prefills:]
        num_rows = len(ids)
        v["ids"][:num_rows] = ids
        v["ids"][num_rows:] = 0
        v["positions"][:num_rows] = positions
        v["positions"][num_rows:] = 0
        v["sample_rows"][:len(sample_rows)] = sample_rows
        slots = v["slots"]
        slots[num_rows:] = -1
        p_tables = v["p_tables"].reshape(layout.prefills, layout.width)
        d_tables = v["d_tables"].reshape(layout.decodes, layout.width)
        dense = tuple((s.q_start, s.q_len) for s in prefills
                      if layout.dense and s.q_len == s.context_len and s.q_len >= DENSE_MIN_TOKENS)
        tile = 0
        for i, s in enumerate(prefills):
            blocks = self._table(s.block_ids)
            pos = np.arange(s.context_len - s.q_len, s.context_len)
            slots[s.q_start:s.q_start + s.q_len] = blocks[pos // bs] * bs + pos % bs
            v["q_start"][i], v["q_len"][i], v["ctx"][i] = s.q_start, s.q_len, s.context_len
            n = min(len(blocks), layout.width)
            p_tables[i, :n] = blocks[:n]
            if (s.q_start, s.q_len) in dense:
                continue
            m0 = np.arange(0, s.q_len, layout.block_m)
            v["tile_seq"][tile:tile + len(m0)] = i
            v["tile_m0"][tile:tile + len(m0)] = m0
            tile += len(m0)
        v["tile_seq"][tile:] = -1
        first = num_rows - num_decodes
        if decodes:
            self._pack_decodes(decodes, first, slots, d_tables, v["d_ctx"])
        v["d_ctx"][num_decodes:] = 0
        v["row0"][0] = first
        self._forget_unused(seqs)
        return dense

    def _pack_decodes(self, decodes: list[SeqSlice], first: int, slots, d_tables, d_ctx) -> None:
        """The decode part of `pack` in a few numpy calls (one Python pass per decode: at 128 decodes a
        per-decode numpy assignment cost ~1 ms of host time per step on the GPU machine)."""
        bs = self.block_size
        n = len(decodes)
        tables = [self._table(s.block_ids) for s in decodes]
        ctx = np.fromiter((s.context_len for s in decodes), dtype=np.int64, count=n)
        used = np.minimum((ctx + bs - 1) // bs, d_tables.shape[1])         # table columns each decode reads
        flat = np.concatenate([t[:u] for t, u in zip(tables, used.tolist())])
        starts = np.cumsum(used) - used
        row = np.repeat(np.arange(n), used)
        d_tables[row, np.arange(len(flat)) - np.repeat(starts, used)] = flat
        last = flat[starts + (ctx - 1) // bs]
        slots[first:first + n] = last * bs + (ctx - 1) % bs
        d_ctx[:n] = ctx

    def meta(self, dev: torch.Tensor, layout: Layout, dense=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PagedMeta]:
        """Views of the device copy of a packed step: ids, positions, sample rows, and the attention metadata."""
        v = {name: dev[start:start + n] for name, (start, n) in layout.offsets.items()}
        meta = PagedMeta(v["slots"], v["tile_seq"], v["tile_m0"], v["q_start"], v["q_len"], v["ctx"],
                         v["p_tables"].view(layout.prefills, layout.width),
                         v["d_tables"].view(layout.decodes, layout.width), v["d_ctx"], v["row0"], layout, dense)
        return v["ids"], v["positions"], v["sample_rows"], meta

    def prepare(self, seqs: list[SeqSlice], num_decodes: int, block_size: int, device: torch.device,
                layout: Layout | None = None) -> PagedMeta:
        """Attention metadata alone (for tests and benchmarks; the runner packs ids and positions too)."""
        layout = layout or self.exact_layout(seqs, num_decodes)
        rows = sum(s.q_len for s in seqs)
        buf = np.zeros(layout.size, dtype=np.int32)
        dense = self.pack(seqs, num_decodes, [0] * rows, [0] * rows, [], layout, buf)
        return self.meta(torch.from_numpy(buf).to(device), layout, dense)[3]

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
    # 8192 tokens 0.96 vs 1.53 ms a layer), so eager steps give it those chunks where the probe below
    # finds it working.
    # cuDNN builds an execution plan for each new length, which took long enough to show as a 0.6 s
    # step in a served trace; so lengths are padded up to a multiple of DENSE_PAD (causal: the padding
    # rows come last and no real row sees them) and `warm_up` builds every plan at start-up.
    def _dense_attention(self, q, k, v) -> torch.Tensor:
        """Causal attention of one chunk over itself; q `[n, H, D]`, k/v `[n, KVH, D]` -> `[n, H, D]`."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n = q.shape[0]
        padded = -(-n // DENSE_PAD) * DENSE_PAD
        q4, k4, v4 = (torch.nn.functional.pad(x.transpose(0, 1), (0, 0, 0, padded - n)).unsqueeze(0)
                      for x in (q, k, v))                                              # [1, heads, padded, D]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True,
                                                                   enable_gqa=self.group > 1)
        return out[0, :, :n].transpose(0, 1)

    def warm_up(self, k_cache, v_cache, max_tokens: int) -> None:
        """Compile what eager steps may need later, so that no step pays for it mid-run: the prefill
        kernel at each tile height, the decode (and combine) kernel at each split count, and the cuDNN
        plan of every padded chunk length up to `max_tokens`. Writes into the first blocks of the given
        (still empty) caches."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        first_of_splits = {}              # split count -> the smallest decode batch that gets it
        for b in range(self.max_num_seqs, 0, -1):
            first_of_splits[self.num_splits(b)] = b
        steps = [(q_len, 0) for q_len in (16, 40, 600)]       # tile heights 16, 64, 128 of exact layouts
        steps += [(0, b) for b in sorted(first_of_splits.values())]
        for q_len, decodes in steps:
            blocks = list(range(-(-max(q_len, 1) // self.block_size)))
            if len(blocks) > k_cache.shape[0]:
                continue
            seqs = [SeqSlice(0, q_len, q_len, blocks)] if q_len else []
            seqs += [SeqSlice(q_len + i, 1, 1, blocks) for i in range(decodes)]
            rows = q_len + decodes
            q = torch.randn(rows, h, d, generator=gen, device=self.device, dtype=k_cache.dtype)
            k = torch.randn(rows, kvh, d, generator=gen, device=self.device, dtype=k_cache.dtype)
            meta = self.prepare(seqs, decodes, self.block_size, self.device,
                                layout=dataclasses.replace(self.exact_layout(seqs, decodes), dense=False))
            self.forward(q, k, k, k_cache, v_cache, meta)
        if self.dense:
            for n in range(DENSE_PAD, max_tokens + DENSE_PAD, DENSE_PAD):
                q = torch.randn(n, h, d, generator=gen, device=self.device, dtype=k_cache.dtype)
                k = torch.randn(n, kvh, d, generator=gen, device=self.device, dtype=k_cache.dtype)
                self._dense_attention(q, k, k)
        torch.cuda.synchronize(self.device)

    def _probe_dense(self) -> bool:
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
        lay = meta.layout
        cb, ct, ch = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
        write_kv[(t,)](k, v, k_cache, v_cache, meta.slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       cb, ct, ch, NUM_KV_HEADS=self.num_kv_heads,
                       HEADS_PAD=triton.next_power_of_2(self.num_kv_heads), HEAD_DIM=d,
                       BLOCK_SIZE=self.block_size, num_warps=4)
        out = q.new_empty((t, self.num_heads, d))
        for r0, n in meta.dense:
            out[r0:r0 + n] = self._dense_attention(q[r0:r0 + n], k[r0:r0 + n], v[r0:r0 + n])
        if lay.tiles:
            prefill_attention[(lay.tiles, self.num_heads)](
                q, k_cache, v_cache, out, meta.tile_seq, meta.tile_m0, meta.seq_q_start, meta.seq_q_len,
                meta.seq_ctx, meta.prefill_tables, lay.width, self.scale_log2,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), cb, ct, ch,
                GROUP=self.group, HEAD_DIM=d, BLOCK_SIZE=self.block_size, BLOCK_M=lay.block_m,
                **self.prefill_launch[lay.block_m])
        if lay.decodes:
            b, splits = lay.decodes, lay.num_splits
            part_acc = self.part_acc[:b * self.num_heads * splits * d]
            part_ml = self.part_ml[:b * self.num_heads * splits * 2]
            decode_attention[(b, self.num_kv_heads, splits)](
                q, k_cache, v_cache, part_acc, part_ml, out, meta.decode_tables, lay.width,
                meta.decode_ctx, meta.row0, self.scale_log2, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                cb, ct, ch, GROUP=self.group, GROUP_PAD=max(16, triton.next_power_of_2(self.group)), HEAD_DIM=d,
                BLOCK_SIZE=self.block_size, NUM_SPLITS=splits, **self.decode_launch)
            if splits > 1:
                combine_splits[(b, self.num_heads)](part_acc, part_ml, out, meta.decode_ctx, meta.row0,
                                                    out.stride(0), out.stride(1), HEAD_DIM=d, NUM_SPLITS=splits,
                                                    num_warps=4)
        return out
