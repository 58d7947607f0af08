"""The model executor: runs a `BatchPlan` on the real model (the replica's `Executor`).

One step = one forward pass over a flat batch: the plan's prefill chunks
(token ranges of prompt + already generated tokens, so a preempted request
recomputes exactly what it had) followed by one token per running decode.
A token is sampled for every decode and for every chunk that completes its
prefill. The measured wall time of the whole step goes back to the loop.

With the triton backend a step of up to the largest bucket size (1,024
tokens) replays the CUDA graph of its bucket (cuda_graphs.py); without graphs
the eager path pads the step to the same bucket layout, so both run the same
shapes. Reading the sampled tokens back is the step's only wait for the GPU.

Under tensor parallelism (`tp`, tensor_parallel.py) this is rank 0's executor: it sends each step's
inputs to the workers, whose executors run `forward` on them, before running its own.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..replica import StepResult
from ..request import Request
from ..running import RunningDecodes
from ..scheduler import BatchPlan
from .attention import AttentionBackend, SeqSlice
from .grammar import Grammars
from .kv_cache import PagedKVCache
from .model import LlamaModel
from .sampler import Sampler
from .sequence import Sequence


@dataclass
class StepTiming:
    """Host time of the last step, by stage (seconds)."""
    prepare_s: float = 0.0     # lay the plan out as token ids, positions, attention metadata; upload
    launch_s: float = 0.0      # enqueue the forward (eager kernels or a graph replay) and the sampler
    wait_s: float = 0.0        # blocked until the sampled tokens reached the host
    output_s: float = 0.0      # hand tokens to sequences: stop-token and length checks


@dataclass
class StepInputs:
    ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    num_decodes: int
    sample_rows: list[int]
    sampled: list[Sequence]


class ModelExecutor:
    ends_requests = True       # each sequence decides its end (replica.py)

    def __init__(self, model: LlamaModel, kv: PagedKVCache, backend: AttentionBackend, device: torch.device,
                 grammars: Grammars | None = None):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.sequences: dict[int, Sequence] = {}   # live, by request id: add() puts, release() takes (read-only elsewhere)
        self.sampler = Sampler(model.config.vocab_size, device)
        self.grammars = grammars or Grammars(None, model.config.vocab_size, ())
        self._released: list[Sequence] = []
        self.num_steps = 0
        # A backend that packs steps (triton) gets fixed bucket layouts for steps of up to the largest
        # bucket (CUDA graphs when captured, the same padded shapes eagerly when not).
        self.buckets: tuple[int, ...] = ()
        self.buffers = None           # cuda_graphs.StepBuffers
        self.graphs = None            # cuda_graphs.StepGraphs
        self.last_timing = StepTiming()
        # Set True to time each step's GPU span with CUDA events (`last_gpu_span`: start, end events
        # around everything the step enqueues); benchmarks use it to separate host and GPU time.
        self.record_gpu_span = False
        self.last_gpu_span = None
        # Optional observer of every sampling step: hook(sequences, logits [n, vocab] float32). It runs
        # before sampling and may edit the logits in place (checks use that to force tokens).
        self.logits_hook = None
        # Rank 0 of a tensor-parallel group (tensor_parallel.TensorParallel): each step goes to the workers too.
        self.tp = None

    # --- sequences: the engine adds, the replica loop releases ---------------
    def add(self, seq: Sequence) -> None:
        rid = seq.request.request_id
        if rid in self.sequences:
            raise ValueError(f"request {rid} is already running")
        self.sequences[rid] = seq

    def release(self, req: Request) -> None:
        """The replica finished `req` (it ran out, stopped, or was aborted): hand its sequence out once."""
        seq = self.sequences.pop(req.request_id, None)
        if seq is not None:
            self.sampler.release(seq)
            self._released.append(seq)

    def take_released(self) -> list[Sequence]:
        """Sequences released since the last call."""
        done, self._released = self._released, []
        return done

    def use_buckets(self, buckets: tuple[int, ...], graphs: bool) -> None:
        """Pack steps for the triton backend; capture a CUDA graph per bucket if `graphs`."""
        from .cuda_graphs import StepBuffers, StepGraphs

        self.buckets = buckets
        self._layouts = {b: self.backend.bucket_layout(b) for b in buckets}
        self.buffers = StepBuffers(max(lay.size for lay in self._layouts.values()), self.device)
        if graphs:
            self.graphs = StepGraphs(self.model, self.kv, self.backend, self.buffers, buckets)
            self.graphs.capture()

    def drop_graphs(self) -> None:
        """Free the CUDA graphs (before a tensor-parallel group is left: NCCL keeps a communicator open while
        a graph that captured its all-reduces lives, and closing it then waits forever)."""
        if self.graphs is not None:
            self.graphs = None
            gc.collect()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def execute(self, plan: BatchPlan, decodes: RunningDecodes) -> StepResult:
        t0 = time.perf_counter()
        step = self._layout(plan, decodes)
        if self.tp is not None:         # the workers run the same step on their shards
            hidden, sample_rows, t1 = self.tp.run_step(step, self.forward)
        else:
            hidden, sample_rows, t1 = self.forward(step)
        finished = []
        t2 = t3 = time.perf_counter()
        if step.sampled:
            masks = self.grammars.masks(step.sampled)     # on the host while the GPU runs the forward pass
            logits = self.model.logits(hidden.index_select(0, sample_rows[:len(step.sampled)]))
            if self.logits_hook is not None:
                self.logits_hook(step.sampled, logits)
            draws = self.sampler.sample(logits, step.sampled, masks)
            self._mark(1)
            t2 = time.perf_counter()
            if self.tp is not None and self.device.type == "cuda":
                self.tp.wait_gpu()
            tokens, logprobs = draws.to_host()
            t3 = time.perf_counter()
            for i, (seq, token) in enumerate(zip(step.sampled, tokens)):
                if seq.matcher is not None:
                    self.grammars.advance(seq, token)
                seq.append(token, logprobs.get(i))
                if seq.finished:            # the sequence decides (stop token, max_tokens): replica.py
                    finished.append(seq.request)
        self.num_steps += 1
        end = time.perf_counter()
        self.last_timing = StepTiming(t1 - t0, t2 - t1, t3 - t2, end - t3)
        return StepResult(end - t0, finished)

    def forward(self, step: StepInputs):
        """The model's hidden states for the step's rows, the rows to sample (on the device), and the host
        time of the first launch."""
        return self._run_packed(step) if self.buffers is not None else self._run_reference(step)

    def _layout(self, plan: BatchPlan, decodes: RunningDecodes) -> StepInputs:
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for chunk in plan.prefills:
            seq = self.sequences[chunk.request.request_id]
            end = chunk.start + chunk.num_tokens
            slices.append(SeqSlice(len(ids), chunk.num_tokens, end, chunk.request.block_ids))
            ids.extend(seq.all_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            if chunk.completes_prefill:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        for req in decodes:
            seq = self.sequences[req.request_id]
            context = len(seq.prompt_ids) + len(seq.output_ids)
            slices.append(SeqSlice(len(ids), 1, context, req.block_ids))
            ids.append(seq.output_ids[-1])
            positions.append(context - 1)
            sample_rows.append(len(ids) - 1)
            sampled.append(seq)
        for s in slices:
            if len(s.block_ids) * bs < s.context_len:
                raise RuntimeError(f"scheduler gave {len(s.block_ids)} KV blocks for {s.context_len} tokens")
        return StepInputs(ids, positions, slices, plan.num_decodes, sample_rows, sampled)

    def _mark(self, end: int) -> float:
        """Host time now; with `record_gpu_span`, also a CUDA event (0: before the step's first launch)."""
        if self.record_gpu_span:
            if not end:
                self.last_gpu_span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.last_gpu_span[end].record()
        return time.perf_counter()

    def bucket(self, num_rows: int, num_prefills: int = 0, num_decodes: int = 0) -> int | None:
        """The smallest bucket whose layout holds the step, or None (an exact eager layout)."""
        for b in self.buckets:
            if self.backend.fits(self._layouts[b], num_rows, num_prefills, num_decodes):
                return b
        return None

    def _run_packed(self, step: StepInputs):
        num_prefills = len(step.slices) - step.num_decodes
        b = self.bucket(len(step.ids), num_prefills, step.num_decodes)
        layout = self._layouts[b] if b else self.backend.exact_layout(step.slices, step.num_decodes)
        buffers = self.buffers
        buffers.wait_until_free()
        big = layout.size > len(buffers.host)
        host = np.empty(layout.size, dtype=np.int32) if big else buffers.host
        dense = self.backend.pack(step.slices, step.num_decodes, step.ids, step.positions, step.sample_rows, layout,
                                  host)
        graph = self.graphs.get(b) if self.graphs is not None and b else None
        t1 = self._mark(0)
        if graph is not None:
            graph.graph.replay()
            hidden, sample_rows = graph.hidden, graph.sample_rows
        else:
            dev = torch.from_numpy(host).to(self.device) if big else buffers.upload(layout)
            ids, positions, sample_rows, meta = self.backend.meta(dev, layout, dense)
            hidden = self.model(ids, positions, self.kv, self.backend, meta)
        buffers.mark_used()
        return hidden, sample_rows, t1

    def _run_reference(self, step: StepInputs):
        dev = self.device
        meta = self.backend.prepare(step.slices, step.num_decodes, self.kv.block_size, dev)
        ids = torch.tensor(step.ids, device=dev)
        positions = torch.tensor(step.positions, device=dev)
        sample_rows = torch.tensor(step.sample_rows, dtype=torch.long, device=dev)
        t1 = self._mark(0)
        return self.model(ids, positions, self.kv, self.backend, meta), sample_rows, t1
