"""CUDA graphs of decode-only steps, one per bucket batch size.

A decode step of an 8B model launches ~10 kernels per layer; launched one by one from Python the GPU
waits on the host (a batch-1 step measured 18.7 ms eager for ~5 ms of GPU work). A graph replays the
whole forward plus the logits in one launch. Graphs need fixed shapes and fixed addresses, so each
bucket size `b` owns views of static input buffers (token ids, positions, KV slots, block tables,
context lengths) and a decode batch of n <= b requests is padded to b: padding rows write no KV
(slot -1) and their logits are ignored. All graphs share one memory pool, captured largest first.
"""

from __future__ import annotations

import time

import torch

from .triton_backend import PagedMeta, TritonPaged


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (and `max_batch` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return tuple(sorted(set(sizes)))


class DecodeGraph:
    def __init__(self, owner: "DecodeGraphs", batch: int):
        self.owner = owner
        self.batch = batch
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None
        self.host_s = (0.0, 0.0, 0.0)    # last run: prepare, copy inputs, replay call (host seconds)

    def run(self, step) -> torch.Tensor:
        """Fill the static inputs for `step` (a runner.StepInputs, decode-only) and replay; logits `[b, vocab]`."""
        o = self.owner
        b = self.batch
        t0 = time.perf_counter()
        meta = o.backend.prepare(step.slices, step.num_decodes, o.block_size, o.device, pad_to=b)
        t1 = time.perf_counter()
        pad = [0] * (b - step.num_decodes)
        o.ids[:b].copy_(torch.tensor(step.ids + pad), non_blocking=True)
        o.positions[:b].copy_(torch.tensor(step.positions + pad), non_blocking=True)
        o.slots[:b].copy_(meta.slots)
        o.ctx[:b].copy_(meta.decode_ctx)
        o.tables[:b, :meta.decode_tables.shape[1]].copy_(meta.decode_tables)
        t2 = time.perf_counter()
        self.graph.replay()
        self.host_s = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return self.logits


class DecodeGraphs:
    def __init__(self, model, kv, backend: TritonPaged, max_batch: int, device: torch.device):
        self.model, self.kv, self.backend, self.device = model, kv, backend, device
        self.block_size = kv.block_size
        self.buckets = bucket_sizes(max_batch)
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.ctx = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.zeros(n, backend.max_blocks, dtype=torch.int32, device=device)
        self._none = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, DecodeGraph] = {}

    def _meta(self, b: int) -> PagedMeta:
        e = self._none
        return PagedMeta(self.slots[:b], 0, e, e, e, e, e, e.view(0, 1), 16, b, self.tables[:b], self.ctx[:b],
                         self.backend.num_splits(b))

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            g = DecodeGraph(self, b)
            meta = self._meta(b)
            for _ in range(2):      # compile the kernels and settle the allocator outside the capture
                self.model.logits(self.model(self.ids[:b], self.positions[:b], self.kv, self.backend, meta))
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(g.graph, pool=pool):
                g.logits = self.model.logits(self.model(self.ids[:b], self.positions[:b], self.kv, self.backend, meta))
            self.graphs[b] = g
            if progress is not None:
                progress(b)
        torch.cuda.synchronize(self.device)

    def get(self, batch: int) -> DecodeGraph | None:
        return self.graphs.get(batch)
