"""CUDA graphs of whole steps, one per bucket size of the flat batch.

Launched one by one from Python, a step's ~400 kernels cost more host time than the GPU needs for a
small batch (measured on the H100: 18.7 ms eager for a ~5 ms batch-1 decode; ~45 us of host time per
Triton launch). A graph replays the step's host-to-device copy of its packed inputs and the whole
forward in one launch. Graphs need fixed shapes and addresses, so each bucket size owns a fixed
`Layout` (triton_backend.py) whose views of one static device buffer are the step's inputs, and a
step of n <= bucket tokens (any mix of prefill chunks and decodes that fits) is padded to it. The
inputs are packed on the host into one pinned buffer, which the graph's first node copies over. All
graphs share one memory pool, captured largest first. Logits are taken outside the graph, only for
the rows to sample.
"""

from __future__ import annotations

import torch

from .triton_backend import Layout, TritonPaged

MAX_GRAPH_ROWS = 1024     # steps of more tokens run eagerly (they are GPU-bound: host launches keep up)


def bucket_sizes(max_num_seqs: int, max_rows: int = MAX_GRAPH_ROWS) -> tuple[int, ...]:
    """1, 2, 4, 8, every multiple of 16 up to max_num_seqs (decode batches), then every 64 up to max_rows."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return tuple(sorted(set(b for b in small if b <= max_rows) | set(range(max(small) + 64, max_rows + 1, 64))))


class StepBuffers:
    """The pinned host buffer a step is packed into and the device buffer it is copied to."""

    def __init__(self, size: int, device: torch.device):
        self.host_t = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host = self.host_t.numpy()
        self.dev = torch.zeros(size, dtype=torch.int32, device=device)
        self.free = torch.cuda.Event() if device.type == "cuda" else None   # the last copy out of `host` is done

    def upload(self, layout: Layout) -> torch.Tensor:
        return self.dev[:layout.size].copy_(self.host_t[:layout.size], non_blocking=True)

    def wait_until_free(self) -> None:
        """A step that samples nothing does not wait for the GPU: before packing the next one over
        the pinned buffer, make sure the previous copy out of it has run."""
        if self.free is not None:
            self.free.synchronize()

    def mark_used(self) -> None:
        if self.free is not None:
            self.free.record()


class StepGraph:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.graph = torch.cuda.CUDAGraph()
        self.hidden: torch.Tensor | None = None
        self.sample_rows: torch.Tensor | None = None


class StepGraphs:
    def __init__(self, model, kv, backend: TritonPaged, buffers: StepBuffers, buckets: tuple[int, ...]):
        self.model, self.kv, self.backend, self.buffers = model, kv, backend, buffers
        self.graphs: dict[int, StepGraph] = {}
        self.buckets = buckets

    def _forward(self, layout: Layout):
        dev = self.buffers.upload(layout)
        ids, positions, sample_rows, meta = self.backend.meta(dev, layout)
        return self.model(ids, positions, self.kv, self.backend, meta), sample_rows

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            g = StepGraph(self.backend.bucket_layout(b))
            self.backend.pack([], 0, [], [], [], g.layout, self.buffers.host)     # all padding
            for _ in range(2):      # compile the kernels and settle the allocator outside the capture
                self._forward(g.layout)
            torch.cuda.synchronize()
            with torch.cuda.graph(g.graph, pool=pool):
                g.hidden, g.sample_rows = self._forward(g.layout)
            self.graphs[b] = g
        torch.cuda.synchronize()

    def get(self, bucket: int) -> StepGraph | None:
        return self.graphs.get(bucket)
