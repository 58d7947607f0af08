"""Time engine steps over a grid of batch shapes: the measurements a batch-time predictor is fitted to.

A step is built by hand (`SyntheticSteps`): requests with negative ids and random token ids (batch time
does not depend on token values), KV blocks from the engine's allocator, one `BatchPlan`, then
`executor.execute(plan, decodes)`, the call the replica loop makes, and everything released. A shape is
one prefill chunk of `prefill_tokens` after `prefill_context` tokens already in the KV cache (the chunk
completes its prompt, so it samples a token) beside `num_decodes` decodes of `decode_context` tokens
each (the CPU reference pads every decode to the longest, so one context per shape keeps the sum, the
predictor's feature, the true cost).

Steps look like serving's, not like a fresh cache's: each sequence's KV blocks are shuffled (a serving
cache hands out blocks scattered by earlier requests, not in order), on backends that do not pad decodes
to the longest (Triton) a shape's decodes get contexts spread over [c/2, 3c/2] with the shape's sum, and
each sequence samples with settings drawn from a `SamplingMix` (`--sampling`; penalized ones take their
sampler slot before the timed step, as a running request holds it). The profile fitted from such steps
predicted greedy serving steps 6-10% too fast before (contiguous blocks, one context, greedy only).

Shapes (`sample_shapes`): a seeded sample, without replacement, of the grid below, split between
decode-only (30%), prefill-only (25%) and mixed (45%) steps. Totals cover the scheduler's budgets (128 ...
2552) and the shorter last chunks of prompts between them; decodes go up to `max_num_seqs`; a prompt's
first chunk (no cached context) is drawn as often as all later chunks together. Shapes that this engine
cannot hold (KV cache, model context) are left out of the sample and reported. The sample runs in a
seeded random order, so that a machine drifting (clocks, other work) adds noise rather than a trend.
"""

from __future__ import annotations

import csv
import math
import platform
import random
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..predictor.fit import kind as kind_of
from ..qos import TIER_PRESETS, DeadlineRule
from ..request import Request, blocks_for
from ..scheduler import BatchPlan, PrefillChunk
from .runner import ModelExecutor
from .sampling import SamplingMix, SamplingParams
from .sequence import Sequence

# Total tokens of prefill-only and mixed steps: the scheduler's candidate budgets and values between them.
TOTALS = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2304, 2552)
DECODES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
DECODE_CONTEXTS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)      # tokens of each decode
PREFILL_CONTEXTS = (0, 256, 512, 1024, 2048, 3072, 4096, 6144)            # cached before the chunk
KIND_SHARES = {"decode": 0.30, "prefill": 0.25, "mixed": 0.45}


@dataclass(frozen=True)
class Shape:
    prefill_tokens: int       # tokens of the one prefill chunk (0: none)
    prefill_context: int      # tokens of the chunk's prompt already in the KV cache
    num_decodes: int
    decode_context: int       # context of each decode, the token it runs included

    @property
    def kind(self) -> str:
        return kind_of(self.prefill_tokens, self.num_decodes)

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.num_decodes

    @property
    def kv_tokens(self) -> int:
        """KV cache tokens the step needs (each sequence gets room for one more token)."""
        prefill = self.prefill_context + self.prefill_tokens + 1 if self.prefill_tokens else 0
        return prefill + self.num_decodes * (self.decode_context + 1)

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks the step takes: each sequence rounds its tokens up to whole blocks."""
        prefill = blocks_for(self.prefill_context + self.prefill_tokens + 1, block_size) if self.prefill_tokens else 0
        return prefill + self.num_decodes * blocks_for(self.decode_context + 1, block_size)


@dataclass
class ProfileRow:
    """One measured shape: the CSV's columns, in order."""
    kind: str                 # decode | prefill | mixed
    prefill_tokens: int
    prefill_context: int
    decodes: int
    decode_context: int       # sum over the decodes (the predictor's feature)
    total_tokens: int
    sampled: int              # rows drawn with temperature or penalties
    wall_s: float             # median over repeats of `execute(...).duration_s`, the whole step
    gpu_s: float | None       # median of the step's CUDA-event span (None off CUDA)
    wall_min_s: float
    repeats: int


COLUMNS = tuple(f.name for f in fields(ProfileRow))


class SyntheticSteps:
    """Runs hand-made steps on an engine's executor and allocator, leaving both as they were."""

    def __init__(self, executor: ModelExecutor, allocator, max_len: int, vocab_size: int, seed: int = 0,
                 sampling: SamplingMix | None = None):
        self.executor = executor
        self.allocator = allocator
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.sampling = sampling
        # the CPU reference pads decodes to the longest: there one context per shape keeps the cost the sum's
        self.spread = executor is not None and executor.backend.name != "torch-reference"
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self._layouts: dict[Shape, tuple[list[int], list[dict]]] = {}
        self.tier = TIER_PRESETS["default"][0]
        self.rule = DeadlineRule()
        self.ids = iter(range(-1, -10**9, -1))     # negative ids: never confused with served requests

    @property
    def kv_room_blocks(self) -> int:
        a = self.allocator
        return a.num_free - a.num_watermark_blocks

    def why_not(self, shape: Shape) -> str | None:
        """Why this engine cannot run `shape` (one reason per kind of limit), or None."""
        if shape.total_tokens == 0:
            return "empty"
        if shape.prefill_tokens and shape.prefill_context + shape.prefill_tokens >= self.max_len:
            return f"prompt over the model context ({self.max_len} tokens)"
        if shape.num_decodes and not 2 <= shape.decode_context < self.max_len:
            return f"decode context outside [2, {self.max_len})"
        if shape.kv_blocks(self.allocator.block_size) + shape.num_decodes * self.spread > self.kv_room_blocks:
            return f"over the KV cache ({self.kv_room_blocks * self.allocator.block_size} tokens free)"
        return None

    def _sequence(self, context: int, outputs: int, settings: dict) -> Sequence:
        prompt = torch.randint(0, self.vocab_size, (context - outputs,), generator=self.gen).tolist()
        params = SamplingParams(max_tokens=outputs + 1, ignore_eos=True, **settings)
        req = Request(next(self.ids), 0.0, len(prompt), outputs + 1, self.tier, self.rule,
                      sampled=not params.plain_greedy)
        seq = Sequence(req, prompt, params, None, (), seed=self.rng.getrandbits(62))
        seq.output_ids = prompt[-outputs:] if outputs else []
        self.allocator.allocate(req, self.allocator.blocks_for(context + 1))
        self.rng.shuffle(req.block_ids)
        self.executor.add(seq)
        self.executor.sampler.admit(seq)
        return seq

    def layout(self, shape: Shape) -> tuple[list[int], list[dict]]:
        """A shape's decode contexts and every sequence's sampling settings (the prefill's first), drawn once per
        shape so that its repeats time the same step."""
        if shape not in self._layouts:
            n, c = shape.num_decodes, shape.decode_context
            contexts = [c] * n
            if self.spread and n > 1:        # spread over [c/2, 3c/2], then walked back to the shape's sum
                low, high = max(2, c // 2), min(self.max_len - 1, c + c // 2)
                contexts = [self.rng.randint(low, high) for _ in range(n)]
                excess = sum(contexts) - n * c
                while excess:
                    for i in range(n):
                        step = -1 if excess > 0 else 1
                        if excess and low <= contexts[i] + step <= high:
                            contexts[i] += step
                            excess += step
            greedy = {"temperature": 0.0}
            settings = [self.sampling.pick(self.rng) if self.sampling else greedy
                        for _ in range(n + bool(shape.prefill_tokens))]
            self._layouts[shape] = (contexts, settings)
        return self._layouts[shape]

    def num_sampled(self, shape: Shape) -> int:
        return sum(not SamplingParams(**s).plain_greedy for s in self.layout(shape)[1])

    def run(self, shape: Shape) -> tuple[float, float | None]:
        """Wall seconds of one `execute` of `shape`, and the GPU span in seconds when the executor records
        one (`record_gpu_span`)."""
        ex, made = self.executor, []
        contexts, settings = self.layout(shape)
        try:
            chunks = []
            if shape.prefill_tokens:
                made.append(self._sequence(shape.prefill_context + shape.prefill_tokens, 0, settings[0]))
                chunks = [PrefillChunk(made[-1].request, shape.prefill_context, shape.prefill_tokens)]
            for context, setting in zip(contexts, settings[len(chunks):]):
                made.append(self._sequence(context, 1, setting))
            decodes = [s.request for s in made[len(chunks):]]
            plan = BatchPlan(0, shape.num_decodes, shape.num_decodes * shape.decode_context, chunks,
                             shape.total_tokens, math.inf, num_sampled_decodes=sum(r.sampled for r in decodes))
            ex.last_gpu_span = None
            wall = ex.execute(plan, decodes).duration_s
            span = ex.last_gpu_span if ex.record_gpu_span else None
            return wall, (span[0].elapsed_time(span[1]) / 1e3 if span is not None else None)
        finally:
            for s in made:
                ex.release(s.request)
                self.allocator.release(s.request)
            ex.take_released()


def grid(max_num_seqs: int) -> dict[str, list[Shape]]:
    """Every shape of the grid, by kind."""
    decodes = [d for d in DECODES if d < max_num_seqs] + [max_num_seqs]
    return {"decode": [Shape(0, 0, d, c) for d in decodes for c in DECODE_CONTEXTS],
            "prefill": [Shape(t, p, 0, 0) for t in TOTALS for p in PREFILL_CONTEXTS],
            "mixed": [Shape(t - d, p, d, c) for t in TOTALS for d in decodes if d < t
                      for p in PREFILL_CONTEXTS for c in DECODE_CONTEXTS]}


def sample_shapes(num_shapes: int, steps: SyntheticSteps, max_num_seqs: int, seed: int = 0,
                  max_total: int | None = None, max_context: int | None = None
                  ) -> tuple[list[Shape], dict[str, list[tuple[Shape, str]]]]:
    """`num_shapes` shapes this engine can run (fewer only if the grid runs out), split by KIND_SHARES, and
    per kind the grid's shapes it cannot run, with why. `max_total`, `max_context`: leave out bigger steps and longer contexts (quick runs)."""
    rng = random.Random(seed)
    shapes, skipped, cum = [], {}, 0.0
    for kind, share in KIND_SHARES.items():
        cum += share
        want = round(num_shapes * cum) - len(shapes)      # a kind whose grid runs short leaves the rest to the next
        fits, skipped[kind] = [], []
        for shape in grid(max_num_seqs)[kind]:
            if (max_total is not None and shape.total_tokens > max_total
                    or max_context is not None and max(shape.prefill_context, shape.decode_context) > max_context):
                continue
            why = steps.why_not(shape)
            (skipped[kind].append((shape, why)) if why else fits.append(shape))
        weights = [len(PREFILL_CONTEXTS) - 1 if s.prefill_tokens and not s.prefill_context else 1 for s in fits]
        shapes += _weighted_sample(fits, weights, min(len(fits), want), rng)
    rng.shuffle(shapes)
    return shapes, skipped


def _weighted_sample(items: list, weights: list[float], k: int, rng: random.Random) -> list:
    """k items without replacement, each drawn with probability proportional to its weight."""
    keys = sorted(range(len(items)), key=lambda i: rng.random() ** (1.0 / weights[i]), reverse=True)
    return [items[i] for i in sorted(keys[:k])]


def profile(steps: SyntheticSteps, shapes: list[Shape], warmup: int = 1, repeats: int = 5,
            max_shape_s: float = math.inf):
    """Time every shape, yielding its row: `warmup` runs first (a new shape's first run on a GPU pays
    one-off costs: kernel selection, cuDNN plans, allocator growth), then the medians of `repeats` runs.
    A step slower than `max_shape_s` (a long CPU step, beside which those costs are noise) runs twice in
    all, its last warm-up run counted."""
    ex = steps.executor
    was = ex.record_gpu_span
    ex.record_gpu_span = ex.device.type == "cuda"
    try:
        steps.run(Shape(16, 0, 1, 32))             # first-call allocations
        for shape in shapes:
            runs = _timed_runs(steps, shape, warmup, repeats, max_shape_s)
            walls = [w for w, _ in runs]
            gpus = [g for _, g in runs if g is not None]
            yield ProfileRow(shape.kind, shape.prefill_tokens, shape.prefill_context, shape.num_decodes,
                             shape.num_decodes * shape.decode_context, shape.total_tokens, steps.num_sampled(shape),
                             statistics.median(walls), statistics.median(gpus) if gpus else None, min(walls),
                             len(runs))
    finally:
        ex.record_gpu_span = was


def _timed_runs(steps: SyntheticSteps, shape: Shape, warmup: int, repeats: int, max_shape_s: float) -> list:
    last = None
    for _ in range(warmup):
        last = steps.run(shape)
    runs = [last] if last is not None and last[0] > max_shape_s else [steps.run(shape)]
    want = repeats if runs[0][0] <= max_shape_s else min(repeats, 2)
    return runs + [steps.run(shape) for _ in range(want - 1)]


def write_csv(rows: list[ProfileRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                        for v in (getattr(r, c) for c in COLUMNS)])


def engine_facts(engine) -> dict:
    """What a profile was measured on: the sidecar JSON of `niyama profile`'s CSV."""
    return {"model": engine.model_name, "device": device_name(engine.device), "device_type": engine.device.type,
            "dtype": str(engine.dtype).removeprefix("torch."), "torch": torch.__version__,
            "attention": engine.executor.backend.name, "cuda_graphs": engine.executor.graphs is not None,
            "kv_tokens": engine.allocator.num_blocks * engine.allocator.block_size,
            "max_num_seqs": engine.config.max_num_seqs}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
