"""The model executor: runs a `BatchPlan` on the real model (the replica's `Executor`).

One step = one forward pass over a flat batch: the plan's prefill chunks
(token ranges of prompt + already generated tokens, so a preempted request
recomputes exactly what it had) followed by one token per running decode.
A token is sampled for every decode and for every chunk that completes its
prefill. The measured wall time of the whole step goes back to the loop.

A decode-only step replays a CUDA graph when the executor has them
(cuda_graphs.py); with a backend that pads, the eager path pads the batch to
the same bucket size, so both paths run the same shapes. Reading the sampled
tokens back is the step's only wait for the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..replica import StepResult
from ..request import Request
from ..running import RunningDecodes
from ..scheduler import BatchPlan
from .attention import AttentionBackend, SeqSlice
from .kv_cache import PagedKVCache
from .model import LlamaModel
from .sampling import sample_on_device
from .sequence import Sequence


@dataclass
class StepTiming:
    """Host time of the last step, by stage (seconds)."""
    prepare_s: float = 0.0     # lay the plan out as token ids, positions, attention metadata; upload
    launch_s: float = 0.0      # enqueue the forward (eager kernels or a graph replay) and the sampler
    wait_s: float = 0.0        # blocked until the sampled tokens reached the host
    output_s: float = 0.0      # hand tokens to sequences: stop checks, detokenization


@dataclass
class StepInputs:
    ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    num_decodes: int
    sample_rows: list[int]
    sampled: list[Sequence]


class ModelExecutor:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, backend: AttentionBackend, device: torch.device):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.sequences: dict[Request, Sequence] = {}
        self.num_steps = 0
        self.graphs = None            # cuda_graphs.DecodeGraphs, set by the engine on a GPU
        self.pad_buckets: tuple[int, ...] = ()   # decode-only batches pad to these sizes (padding backends)
        self.last_timing = StepTiming()
        # Optional observer of every sampling step: hook(sequences, logits [n, vocab] float32). It runs
        # before sampling and may edit the logits in place (checks use that to force tokens).
        self.logits_hook = None

    @torch.inference_mode()
    def execute(self, plan: BatchPlan, decodes: RunningDecodes) -> StepResult:
        t0 = time.perf_counter()
        step = self._layout(plan, decodes)
        pad_to = self.bucket(step.num_decodes) if not plan.prefills else None
        graph = self.graphs.get(pad_to) if self.graphs is not None and pad_to else None
        if graph is not None:
            t1 = time.perf_counter()
            logits = graph.run(step)
        else:
            logits, t1 = self._forward_eager(step, pad_to)
        logits = logits[:len(step.sampled)] if step.sampled else None
        stopped = []
        if logits is not None:
            if self.logits_hook is not None:
                self.logits_hook(step.sampled, logits)
            on_device = sample_on_device(logits, [s.params for s in step.sampled], [s.generator for s in step.sampled])
            t2 = time.perf_counter()
            tokens = on_device.tolist()
            t3 = time.perf_counter()
            for seq, token in zip(step.sampled, tokens):
                seq.append(token)
                if seq.finish_reason == "stop":
                    stopped.append(seq.request)
        else:
            t2 = t3 = time.perf_counter()
        self.num_steps += 1
        end = time.perf_counter()
        self.last_timing = StepTiming(t1 - t0, t2 - t1, t3 - t2, end - t3)
        return StepResult(end - t0, stopped)

    def _layout(self, plan: BatchPlan, decodes: RunningDecodes) -> StepInputs:
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for chunk in plan.prefills:
            seq = self.sequences[chunk.request]
            end = chunk.start + chunk.num_tokens
            slices.append(SeqSlice(len(ids), chunk.num_tokens, end, chunk.request.block_ids))
            ids.extend(seq.all_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            if chunk.completes_prefill:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        for req in decodes:
            seq = self.sequences[req]
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

    def bucket(self, n: int) -> int | None:
        """The padded size of a decode-only batch of n, or None (no padding: the batch as it is)."""
        return next((b for b in self.pad_buckets if b >= n), None) if n else None

    def _forward_eager(self, step: StepInputs, pad_to: int | None) -> tuple[torch.Tensor | None, float]:
        dev = self.device
        pad = (pad_to or step.num_decodes) - step.num_decodes
        kw = {"pad_to": pad_to} if pad_to else {}
        meta = self.backend.prepare(step.slices, step.num_decodes, self.kv.block_size, dev, **kw)
        ids = torch.tensor(step.ids + [0] * pad, device=dev)
        positions = torch.tensor(step.positions + [0] * pad, device=dev)
        t1 = time.perf_counter()
        hidden = self.model(ids, positions, self.kv, self.backend, meta)
        if not step.sampled:
            return None, t1
        if pad_to:    # every row, padding included: the graph computes the same shapes
            return self.model.logits(hidden), t1
        return self.model.logits(hidden[torch.tensor(step.sample_rows, device=dev)]), t1
