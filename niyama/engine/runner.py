"""The model executor: runs a `BatchPlan` on the real model (the replica's `Executor`).

One step = one forward pass over a flat batch: the plan's prefill chunks
(token ranges of prompt + already generated tokens, so a preempted request
recomputes exactly what it had) followed by one token per running decode.
A token is sampled for every decode and for every chunk that completes its
prefill. The measured wall time of the whole step goes back to the loop.
"""

from __future__ import annotations

import time

import torch

from ..replica import StepResult
from ..request import Request
from ..running import RunningDecodes
from ..scheduler import BatchPlan
from .attention import AttentionBackend, SeqSlice
from .kv_cache import PagedKVCache
from .model import LlamaModel
from .sampling import sample
from .sequence import Sequence


class ModelExecutor:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, backend: AttentionBackend, device: torch.device):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.sequences: dict[Request, Sequence] = {}
        self.num_steps = 0
        # Optional observer of every sampling step: hook(sequences, logits [n, vocab] float32). It runs
        # before sampling and may edit the logits in place (checks use that to force tokens).
        self.logits_hook = None

    @torch.inference_mode()
    def execute(self, plan: BatchPlan, decodes: RunningDecodes) -> StepResult:
        t0 = time.perf_counter()
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
        dev = self.device
        meta = self.backend.prepare(slices, plan.num_decodes, bs, dev)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                            self.kv, self.backend, meta)
        stopped = []
        if sampled:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=dev)])
            if self.logits_hook is not None:
                self.logits_hook(sampled, logits)
            tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
            for seq, token in zip(sampled, tokens):
                seq.append(token)
                if seq.finish_reason == "stop":
                    stopped.append(seq.request)
        self.num_steps += 1
        return StepResult(time.perf_counter() - t0, stopped)
