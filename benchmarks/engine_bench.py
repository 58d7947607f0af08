"""Engine speed against the machine's own ceilings and against HF transformers, in one run.

Measured, in this order (each section's numbers are saved as soon as it finishes):

1. ceilings: device-to-device copy bandwidth (a 2 GiB copy, bytes read + written) and the GEMM rate
   (8192^3 on random data in the run's dtype), medians over repeats, timed with CUDA events;
2. niyama engine steps (one engine with a KV cache for 128 x 2048 tokens): wall time of a whole
   `executor.execute(plan, decodes)` call, which ends by reading the sampled tokens back to the host,
   median after warm-up; steps are hand-made as `niyama/engine/calibrate.py` makes them:
   decode at batch 1 / 32 / 128 x context 512 / 2048, prefill of one 512 / 2048 / 8192-token chunk,
   and the mixed step (a 256-token prefill chunk beside 64 decodes at context 2048); and decode steps
   with real clients' sampling beside greedy ones at batch 1 / 32 / 128 x 2048 and 256 x 1024: "chat"
   (temperature 0.7, top_p 0.9), "top-k" (0.7, top_k 50), "chat-penalized" (chat + repetition_penalty
   1.1). A decode batch's sequences live across its timed steps, as in serving (a penalized one takes
   its sampler slot once), and each step's token is taken back after it;
3. CPU overhead: 128 requests run through the real `replica.step()` loop; over 50 decode-only steps,
   the step's wall time, the span of `executor.execute` between CUDA events recorded just before and
   after it (the GPU's time for the step, idle gaps while the host launches included), and
   overhead = wall - span; the medians of `executor.last_timing` fields where the executor has them,
   and the time of `scheduler.schedule`;
4. HF transformers (`LlamaForCausalLM`, sdpa, same shape, dtype and random weights): decode steps
   over a `DynamicCache` of random K/V, and prefills, the same shapes, tokens read back to the host;
5. offline throughput: the shipped ShareGPT trace (1,000 requests) all arriving at t=0 on an engine
   at its default settings (KV cache sized from free memory), through `replay`; wall time of the
   whole call, generated and processed (prompt + output) tokens per second. A time budget stops it
   early (the partial rates are reported), so that the whole run stays under 8 minutes on an H100.

Floors, from the ceilings above. For a model of P = num_params parameters, vocabulary V, hidden
size h, L layers, H query heads of size D, E = kv_bytes_per_token (elements per token) and s bytes
per element:

    weights read     W = P - V*h              (the embedding table is only gathered; lm_head is read;
                                               a tied lm_head is the table, W = P)
    decode B x C:    bytes = W*s + B*C*E*s
                     flops = 2*W*B + 4*B*C*H*D*L               (QK and PV over C keys)
    prefill of T:    bytes = W*s
                     flops = 2*(W - V*h)*T + 2*V*h + 2*T*T*H*D*L  (lm_head for the last token only;
                                                                causal QK and PV: half of 4*T*T*H*D)
    time floor       max(bytes / copy bandwidth, flops / GEMM rate); "bound" names the larger
    mixed step       floor = prefill floor (256) + decode floor (64 x 2048), as the issue defines it;
                     also the combined floor of one pass: bytes = decode bytes (weights read once),
                     flops = prefill flops + decode flops

Run on the GPU machine (under 8 minutes on an H100: the offline run stops at a 210 s budget; random
Llama-3-8B-shaped bf16 weights):

    python benchmarks/engine_bench.py --out $OUT/engine_bench.json
    python benchmarks/engine_bench.py --attention triton --no-cuda-graphs --sections decode,mixed
    python benchmarks/engine_bench.py --shape tiny --device cpu --dtype float32 --quick   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from niyama.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.config import SHAPES, ModelConfig  # noqa: E402
from niyama.engine.engine import parse_dtype  # noqa: E402
from niyama.engine.kv_cache import dtype_size  # noqa: E402
from niyama.engine.trace_replay import replay  # noqa: E402
from niyama.engine.sampling import SAMPLING_PRESETS, SamplingMix  # noqa: E402
from niyama.engine.sequence import Sequence  # noqa: E402
from niyama.qos import DeadlineRule, Tier  # noqa: E402
from niyama.request import Request  # noqa: E402
from niyama.scheduler import BatchPlan, PrefillChunk  # noqa: E402
from niyama.workload import make_workload  # noqa: E402

SECTIONS = ("ceilings", "decode", "prefill", "mixed", "overhead", "hf", "offline")
ENGINE_SECTIONS = ("decode", "prefill", "mixed", "overhead")
BENCH_TIER = Tier("bench", ttlt_s=3600.0)    # loose deadlines: the scheduler never starves prefills


@dataclasses.dataclass(frozen=True)
class Sizes:
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    mixed: tuple[int, int, int]          # prefill chunk tokens, decodes, decode context
    overhead_running: int
    overhead_prompt: int
    overhead_steps: int
    copy_bytes: int
    gemm_n: int
    warmup: int
    repeats: int
    kv_tokens: int
    offline_requests: int
    offline_max_prompt: int | None       # clip the trace (quick CPU runs)
    offline_max_output: int | None
    sampled_decodes: tuple[tuple[int, int], ...] = ()    # (batch, context) decodes timed with each sampling
    samplings: tuple[str, ...] = ()                       # SAMPLING_PRESETS timed beside greedy there


FULL = Sizes((1, 32, 128), (512, 2048), (512, 2048, 8192), (256, 64, 2048), 128, 512, 50,
             2 * 2**30, 8192, 2, 7, 300_000, 1000, None, None,
             ((1, 2048), (32, 2048), (128, 2048), (256, 1024)), ("chat", "top-k", "chat-penalized"))
QUICK = Sizes((1, 4), (64, 128), (64, 128), (32, 4, 128), 8, 32, 10,
              16 * 2**20, 256, 1, 3, 16_384, 20, 64, 16, ((4, 128),), ("chat", "chat-penalized"))

# The targets, by figure: (text, test of the figure's record).
TARGETS = {
    "decode b1 c2048": ("<= 5.9 ms", lambda f: f["niyama_s"] <= 5.9e-3),
    "decode b128 c2048": ("<= 1.25x floor", lambda f: f["niyama_over_floor"] <= 1.25),
    "prefill 2048": (">= 40K tok/s", lambda f: f["niyama_tok_s"] >= 40e3),
    "prefill 8192": (">= 36K tok/s", lambda f: f["niyama_tok_s"] >= 36e3),
    "mixed 256+64x2048": ("<= 1.2x sum of floors", lambda f: f["niyama_over_floor"] <= 1.2),
    "offline": (">= 20K processed tok/s", lambda f: f["processed_tok_s"] >= 20e3),
    "cpu overhead": ("<= 1 ms/step", lambda f: f.get("host_critical_s", f["overhead_s"]) <= 1e-3),
    "decode b128 c2048 chat": ("<= 1.05x greedy", lambda f: f["over_greedy"] <= 1.05),
    "decode b256 c1024 chat": ("<= 1.10x greedy", lambda f: f["over_greedy"] <= 1.10),
    "decode b128 c2048 chat-penalized": ("<= 1.10x greedy", lambda f: f["over_greedy"] <= 1.10),
    "decode b256 c1024 chat-penalized": ("<= 1.15x greedy", lambda f: f["over_greedy"] <= 1.15),
}


# --- timing helpers -----------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_seconds(fn, device: torch.device):
    """(seconds, result) of one call of `fn`: CUDA events around it on a GPU, perf_counter on a CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, out


def median_run(fn, warmup: int, repeats: int) -> dict:
    """Median (and samples) of `fn()`, which returns the seconds of one run, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = [fn() for _ in range(repeats)]
    return {"seconds": statistics.median(samples), "samples_s": [round(s, 6) for s in samples]}


def guarded(fn, device: torch.device) -> dict:
    """`fn()`, or {"error": ...} when the device runs out of memory (the run goes on)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        error = f"OOM: {str(e).splitlines()[0]}"
    free_memory(device)
    return {"error": error}


# --- ceilings and floors --------------------------------------------------------
def measure_ceilings(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    src = torch.full((sizes.copy_bytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = median_run(lambda: device_seconds(lambda: dst.copy_(src), device)[0], 3, 10)
    del src, dst
    n = sizes.gemm_n
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    gemm = median_run(lambda: device_seconds(lambda: torch.mm(a, b, out=c), device)[0], 3, 20)
    del a, b, c
    free_memory(device)
    return {"copy_bytes": sizes.copy_bytes, "copy_s": copy["seconds"],
            "copy_bytes_per_s": 2 * sizes.copy_bytes / copy["seconds"],
            "gemm_n": n, "gemm_dtype": str(dtype), "gemm_s": gemm["seconds"],
            "gemm_flops_per_s": 2 * n**3 / gemm["seconds"]}


def weights_read(c: ModelConfig) -> int:
    """Parameters one forward reads: all but the embedding table (a tied lm_head is that table)."""
    return c.num_params - (0 if c.tie_embeddings else c.vocab_size * c.hidden_size)


def decode_cost(c: ModelConfig, batch: int, context: int, size: int) -> tuple[float, float]:
    w = weights_read(c)
    return (w * size + batch * context * c.kv_bytes_per_token * size,
            2 * w * batch + 4 * batch * context * c.num_heads * c.head_dim * c.num_layers)


def prefill_cost(c: ModelConfig, tokens: int, size: int) -> tuple[float, float]:
    w, head = weights_read(c), c.vocab_size * c.hidden_size
    return (w * size,
            2 * (w - head) * tokens + 2 * head + 2 * tokens * tokens * c.num_heads * c.head_dim * c.num_layers)


def floor(cost: tuple[float, float], ceilings: dict) -> dict:
    nbytes, flops = cost
    memory_s, compute_s = nbytes / ceilings["copy_bytes_per_s"], flops / ceilings["gemm_flops_per_s"]
    return {"bytes": nbytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "floor_s": max(memory_s, compute_s), "bound": "memory" if memory_s >= compute_s else "compute"}


def figure_floor(fig: dict, c: ModelConfig, size: int, ceilings: dict) -> dict:
    if fig["kind"] == "decode":
        return floor(decode_cost(c, fig["batch"], fig["context"], size), ceilings)
    if fig["kind"] == "prefill":
        return floor(prefill_cost(c, fig["tokens"], size), ceilings)
    pre, dec = prefill_cost(c, fig["tokens"], size), decode_cost(c, fig["batch"], fig["context"], size)
    parts = {"prefill": floor(pre, ceilings), "decode": floor(dec, ceilings)}
    return {**parts, "floor_s": parts["prefill"]["floor_s"] + parts["decode"]["floor_s"],
            "combined": floor((dec[0], pre[1] + dec[1]), ceilings)}


def make_figures(sizes: Sizes) -> dict[str, dict]:
    figs = [{"name": f"decode b{b} c{c}", "kind": "decode", "batch": b, "context": c}
            for c in sizes.decode_contexts for b in sizes.decode_batches]
    greedy = {(f["batch"], f["context"]) for f in figs}
    figs += [{"name": f"decode b{b} c{c}", "kind": "decode", "batch": b, "context": c}
             for b, c in sizes.sampled_decodes if (b, c) not in greedy]
    figs += [{"name": f"decode b{b} c{c} {s}", "kind": "decode", "batch": b, "context": c, "sampling": s}
             for b, c in sizes.sampled_decodes for s in sizes.samplings]
    figs += [{"name": f"prefill {t}", "kind": "prefill", "tokens": t} for t in sizes.prefill_tokens]
    p, d, c = sizes.mixed
    figs.append({"name": f"mixed {p}+{d}x{c}", "kind": "mixed", "tokens": p, "batch": d, "context": c})
    return {f["name"]: f for f in figs}


# --- niyama: hand-made steps through the executor ---------------------------------
class SyntheticSteps:
    """Steps built as calibrate.py builds them: requests with negative ids and random prompts, KV blocks
    from the engine's allocator, one `BatchPlan`, `executor.execute`, then everything released."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.gen = torch.Generator().manual_seed(0)
        self.ids = itertools.count(-1, -1)
        self.rule = DeadlineRule()

    def _sequence(self, context: int, outputs: int, params: SamplingParams | None = None, room: int = 1) -> Sequence:
        e = self.engine
        prompt = torch.randint(0, e.model_config.vocab_size, (context - outputs,), generator=self.gen).tolist()
        req = Request(next(self.ids), 0.0, len(prompt), outputs + 1, BENCH_TIER, self.rule)
        params = params or SamplingParams(temperature=0)
        seq = Sequence(req, prompt, dataclasses.replace(params, max_tokens=outputs + room, ignore_eos=True),
                       None, (), seed=-req.request_id)
        seq.output_ids = prompt[-outputs:] if outputs else []
        e.allocator.allocate(req, e.allocator.blocks_for(context + room))
        e.executor.add(seq)
        return seq

    def _release(self, made: list[Sequence]) -> None:
        e = self.engine
        for s in made:
            e.executor.release(s.request)
            e.allocator.release(s.request)
        e.executor.take_released()

    def run(self, prefill: int, decodes: int, context: int, prefix: int = 0) -> float:
        """Wall seconds of one `execute` of a `prefill`-token chunk (after `prefix` cached tokens) beside
        `decodes` decodes at `context`."""
        made = []
        try:
            chunks = []
            if prefill:
                made.append(self._sequence(prefix + prefill, 0))
                chunks = [PrefillChunk(made[-1].request, prefix, prefill)]
            for _ in range(decodes):
                made.append(self._sequence(context, 1))
            return self._execute(chunks, [s.request for s in made[bool(prefill):]], context)
        finally:
            self._release(made)

    def _execute(self, chunks: list, decode_reqs: list, context: int) -> float:
        decodes = len(decode_reqs)
        plan = BatchPlan(0, decodes, decodes * context, chunks, sum(c.num_tokens for c in chunks) + decodes, math.inf)
        sync(self.engine.device)
        t0 = time.perf_counter()
        self.engine.executor.execute(plan, decode_reqs)
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def decode_batch(self, batch: int, context: int, params: SamplingParams):
        """A function timing one decode step of `batch` sequences at `context` that live across calls, as in
        serving; each step's token is taken back after it."""
        made = [self._sequence(context, 1, params, room=2) for _ in range(batch)]
        reqs = [s.request for s in made]

        def step() -> float:
            seconds = self._execute([], reqs, context)
            for s in made:
                del s.output_ids[1:]
                if s.logprobs:
                    del s.logprobs[1:]
                s.finish_reason = None
            return seconds

        try:
            yield step
        finally:
            self._release(made)


def time_figure(steps: SyntheticSteps, fig: dict, sizes: Sizes) -> dict:
    prefill = fig.get("tokens", 0)
    decodes, context = fig.get("batch", 0), fig.get("context", 0)
    if fig["kind"] == "decode":
        params = SamplingParams(**SAMPLING_PRESETS[fig.get("sampling", "greedy")])
        with steps.decode_batch(decodes, context, params) as step:
            out = median_run(step, sizes.warmup, sizes.repeats)
    else:
        out = median_run(lambda: steps.run(prefill, decodes, context), sizes.warmup, sizes.repeats)
    out["tok_s"] = (prefill + decodes) / out["seconds"]
    return out


# --- niyama: CPU overhead in the real loop -----------------------------------------
@contextlib.contextmanager
def instrumented(engine: LLMEngine):
    """Time every `executor.execute` (wall and device span) and `scheduler.schedule` call, and keep the
    executor's `last_timing` if it has one; the wrappers are instance attributes, removed afterwards."""
    executor, scheduler = engine.executor, engine.scheduler
    execute, schedule = executor.execute, scheduler.schedule
    log = {"execute_wall": [], "execute_span": [], "gpu_span": [], "schedule": [], "last_timing": []}
    if hasattr(executor, "record_gpu_span") and engine.device.type == "cuda":
        executor.record_gpu_span = True

    def timed_execute(plan, decodes):
        t0 = time.perf_counter()
        span, result = device_seconds(lambda: execute(plan, decodes), engine.device)
        log["execute_wall"].append(time.perf_counter() - t0)
        log["execute_span"].append(span)
        events = getattr(executor, "last_gpu_span", None)
        if events is not None:     # from the step's first launch to its last (host packing excluded)
            log["gpu_span"].append(events[0].elapsed_time(events[1]) / 1e3)
        timing = getattr(executor, "last_timing", None)
        if timing is not None:
            log["last_timing"].append(dataclasses.asdict(timing) if dataclasses.is_dataclass(timing)
                                      else dict(vars(timing)))
        return result

    def timed_schedule(*args, **kwargs):
        t0 = time.perf_counter()
        plan = schedule(*args, **kwargs)
        log["schedule"].append(time.perf_counter() - t0)
        return plan

    executor.execute, scheduler.schedule = timed_execute, timed_schedule
    try:
        yield log
    finally:
        del executor.execute, scheduler.schedule
        if hasattr(executor, "record_gpu_span"):
            executor.record_gpu_span = False


def measure_overhead(engine: LLMEngine, sizes: Sizes) -> dict:
    running, prompt, steps, warmup = sizes.overhead_running, sizes.overhead_prompt, sizes.overhead_steps, 5
    # every request must still be decoding at the end: room for prefill steps at the smallest budget
    max_tokens = warmup + steps + running + math.ceil(running * prompt / 128) + 8
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    seqs = [engine.add_request(torch.randint(0, vocab, (prompt,), generator=gen).tolist(), params, tier=BENCH_TIER)
            for _ in range(running)]
    replica = engine.replica
    first = replica.iteration
    try:
        while len(replica.decodes) < running:
            if replica.iteration - first > max_tokens - warmup - steps:
                raise RuntimeError(f"only {len(replica.decodes)} of {running} requests decoding "
                                   f"after {replica.iteration} steps")
            replica.step()
        for _ in range(warmup):
            replica.step()
        walls = []
        with instrumented(engine) as log:
            for _ in range(steps):
                t0 = time.perf_counter()
                replica.step()
                walls.append(time.perf_counter() - t0)
        assert len(replica.decodes) == running, "a request finished during the timed steps"
    finally:
        for s in seqs:
            engine.abort(s)
    med = statistics.median
    out = {"running": running, "prompt_tokens": prompt, "steps": steps,
           "step_wall_s": med(walls), "execute_span_s": med(log["execute_span"]),
           "execute_wall_s": med(log["execute_wall"]), "schedule_s": med(log["schedule"]),
           "overhead_s": med(w - s for w, s in zip(walls, log["execute_span"])), "last_timing": None}
    if log["gpu_span"]:
        # the honest figure: all host time on the step's critical path (scheduling, packing the inputs,
        # handling the tokens); the GPU span runs from the step's first launch to its sampled tokens
        out["gpu_span_s"] = med(log["gpu_span"])
        out["host_critical_s"] = med(w - g for w, g in zip(walls, log["gpu_span"]))
    if log["last_timing"]:
        fields = [k for k, v in log["last_timing"][0].items() if isinstance(v, float)]
        out["last_timing"] = {k: med(t[k] for t in log["last_timing"]) for k in fields}
    return out


# --- HF transformers ----------------------------------------------------------------
def build_hf(shape: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(LlamaConfig(**shape.to_hf()), dtype=dtype,
                                             attn_implementation="sdpa").eval()


def hf_decode(model, batch: int, context: int, sizes: Sizes, device: torch.device) -> dict:
    """One decode step over a cache of `context - 1` random tokens (context `context` with the new one);
    the cache is cropped back between runs."""
    from transformers import DynamicCache

    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    shape = (batch, cfg.num_key_value_heads, context - 1, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device),
                     layer)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context - 1, device=device)
    # transformers 5.x renames `past_key_values` to `cache`
    cache_kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kw)
        out.logits[:, -1].argmax(-1).tolist()
        seconds = time.perf_counter() - t0
        cache.crop(-1)      # negative: drop that many tokens (every transformers version reads it so)
        return seconds

    return median_run(run, sizes.warmup, sizes.repeats)


def hf_prefill(model, tokens: int, sizes: Sizes, device: torch.device) -> dict:
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, **keep).logits[:, -1].argmax(-1).tolist()
        return time.perf_counter() - t0

    out = median_run(run, sizes.warmup, sizes.repeats)
    out["tok_s"] = tokens / out["seconds"]
    return out


# --- offline throughput -------------------------------------------------------------
class OutOfTime(Exception):
    pass


def measure_offline(engine: LLMEngine, sizes: Sizes, num_requests: int, budget_s: float,
                    sampling: SamplingMix | None = None) -> dict:
    wl = make_workload("sharegpt", 1.0, num_requests=num_requests, seed=0)
    wl = dataclasses.replace(wl, specs=[dataclasses.replace(s, arrival_s=0.0) for s in wl.specs])
    tokens = {"processed": 0, "generated": 0, "preempted": 0, "relegated": 0}
    steps = []

    def count(plan, result, end):
        tokens["preempted"] += len(plan.preempted)
        tokens["relegated"] += len(plan.relegated)
        tokens["processed"] += plan.num_tokens
        tokens["generated"] += plan.num_decodes + sum(c.completes_prefill for c in plan.prefills)
        steps.append((plan.num_prefill_tokens, plan.num_decodes, plan.decode_context, result.duration_s))

    def progress(unfinished):
        if time.perf_counter() - t0 > budget_s:
            raise OutOfTime

    engine.replica.on_step.append(count)
    t0 = time.perf_counter()
    clipped, status = None, "finished"
    try:
        clipped = replay(engine, wl, progress=progress, max_prompt_tokens=sizes.offline_max_prompt,
                         max_output_tokens=sizes.offline_max_output, sampling=sampling).num_clipped
    except OutOfTime:
        status = f"stopped at the {budget_s:g} s budget"
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    wall = time.perf_counter() - t0
    done = num_requests - engine.replica.num_unfinished
    if status != "finished":
        status += f" after {wall:.1f} s, {done} of {num_requests} done"
    return {"requests": num_requests, "finished": done, "status": status, "wall_s": wall,
            "steps": engine.replica.iteration, "clipped": clipped, "processed_tokens": tokens["processed"],
            "generated_tokens": tokens["generated"], "output_tok_s": tokens["generated"] / wall,
            "processed_tok_s": tokens["processed"] / wall, "preemptions": tokens["preempted"],
            "relegations": tokens["relegated"], "profile": engine.profile.name,
            "sampling": sampling.name if sampling else "greedy",
            "kv_tokens": engine.allocator.num_blocks * engine.allocator.block_size, "step_kinds": step_kinds(steps)}


def step_kinds(steps: list[tuple]) -> dict:
    """Where the offline run's time went: steps by kind, their count, mean tokens and time."""
    kinds = {"prefill only": lambda p, d: p and not d, "decode only": lambda p, d: d and not p,
             "mixed": lambda p, d: p and d}
    out = {}
    for name, test in kinds.items():
        rows = [s for s in steps if test(s[0], s[1])]
        if rows:
            out[name] = {"steps": len(rows), "seconds": round(sum(r[3] for r in rows), 2),
                         "mean_prefill_tokens": round(statistics.mean(r[0] for r in rows)),
                         "mean_decodes": round(statistics.mean(r[1] for r in rows), 1),
                         "mean_decode_context": round(statistics.mean(r[2] / r[1] for r in rows if r[1])) if any(
                             r[1] for r in rows) else 0,
                         "mean_step_ms": round(1e3 * statistics.mean(r[3] for r in rows), 2)}
    return out


# --- the run ------------------------------------------------------------------------
def engine_options(args) -> dict:
    """`attention` and `cuda_graphs` only where asked for, and `cuda_graphs` only where EngineConfig has it."""
    opts = {}
    if args.attention:
        opts["attention"] = args.attention
    if args.no_cuda_graphs:
        if "cuda_graphs" in {f.name for f in dataclasses.fields(EngineConfig)}:
            opts["cuda_graphs"] = False
        else:
            print("note: this engine has no cuda_graphs option; --no-cuda-graphs changes nothing", flush=True)
    return opts


def make_engine(args, **kw) -> LLMEngine:
    engine = LLMEngine(model=args.shape, load_format="dummy", device=str(args.device), dtype=args.dtype,
                       **engine_options(args), **kw)
    print(engine.describe(), flush=True)
    return engine


def engine_info(engine: LLMEngine) -> dict:
    """What the engine was asked for and what it runs (the backend, whether it holds CUDA graphs)."""
    return {"describe": engine.describe(), "attention": engine.config.attention,
            "cuda_graphs": getattr(engine.config, "cuda_graphs", None),
            "backend": engine.executor.backend.name, "graphs": getattr(engine.executor, "graphs", None) is not None,
            "kv_tokens": engine.allocator.num_blocks * engine.allocator.block_size}


def run_engine_sections(args, sizes: Sizes, sections: set[str], results: dict, save) -> None:
    engine = make_engine(args, kv_tokens=args.kv_tokens or sizes.kv_tokens)
    results["engine"] = engine_info(engine)
    steps = SyntheticSteps(engine)
    for fig in results["figures"].values():
        if fig["kind"] in sections:
            fig["niyama"] = guarded(lambda: time_figure(steps, fig, sizes), args.device)
            print(f"  niyama {fig['name']}: {show(fig['niyama'], fig['kind'])}", flush=True)
            save()
    if "overhead" in sections:
        results["overhead"] = guarded(lambda: measure_overhead(engine, sizes), args.device)
        o = results["overhead"]
        print("  niyama cpu overhead: " + (o.get("error") or
              f"step {ms(o['step_wall_s'])}, execute span {ms(o['execute_span_s'])}, overhead "
              f"{ms(o['overhead_s'])}, host on the critical path {ms(o.get('host_critical_s', float('nan')))} "
              f"(GPU span {ms(o.get('gpu_span_s', float('nan')))}), schedule {ms(o['schedule_s'])}, "
              f"last_timing {o['last_timing']}"), flush=True)
        save()


def run_hf_section(args, sizes: Sizes, shape: ModelConfig, results: dict, save) -> None:
    import transformers

    dtype = parse_dtype(args.dtype)
    model = build_hf(shape, args.device, dtype)
    with torch.inference_mode():
        for fig in results["figures"].values():
            if fig["kind"] == "decode":
                fig["hf"] = guarded(lambda: hf_decode(model, fig["batch"], fig["context"], sizes, args.device),
                                    args.device)
            elif fig["kind"] == "prefill":
                fig["hf"] = guarded(lambda: hf_prefill(model, fig["tokens"], sizes, args.device), args.device)
            else:
                continue
            free_memory(args.device)
            print(f"  transformers {transformers.__version__} {fig['name']}: {show(fig['hf'], fig['kind'])}",
                  flush=True)
            save()


def environment(args) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor()
            or platform.machine(), "torch": torch.__version__, "transformers": version("transformers"),
            "triton": version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "git": git.stdout.strip() or None}


# --- report -------------------------------------------------------------------------
def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def tok_s(rate: float) -> str:
    return f"{rate / 1e3:.3g}K tok/s"


def show(m: dict | None, kind: str) -> str:
    if not m:
        return "-"
    if "error" in m:
        return m["error"][:40]
    return ms(m["seconds"]) + (f" ({tok_s(m['tok_s'])})" if kind == "prefill" else "")


def finish_figures(results: dict) -> None:
    """Ratios to the floors and to the greedy step of the same shape, and the flat fields the targets test."""
    figures = results["figures"]
    for fig in figures.values():
        ours = fig.get("niyama") or {}
        if "seconds" in ours:
            fig["niyama_s"], fig["niyama_tok_s"] = ours["seconds"], ours["tok_s"]
            if "sampling" in fig:
                greedy = (figures.get(f"decode b{fig['batch']} c{fig['context']}") or {}).get("niyama") or {}
                if "seconds" in greedy:
                    fig["over_greedy"] = ours["seconds"] / greedy["seconds"]
            if "floor" in fig:
                fig["niyama_over_floor"] = ours["seconds"] / fig["floor"]["floor_s"]
                if "combined" in fig["floor"]:
                    fig["niyama_over_combined_floor"] = ours["seconds"] / fig["floor"]["combined"]["floor_s"]


def target_cell(name: str, record: dict) -> str:
    if name not in TARGETS:
        return "-"
    text, test = TARGETS[name]
    try:
        return f"{text} ({'met' if test(record) else 'MISSED'})"
    except (KeyError, TypeError):
        return text


def table(results: dict) -> str:
    rows = [("figure", "niyama", "HF", "floor", "niyama/floor", "target")]
    for name, fig in results["figures"].items():
        if "niyama" not in fig and "hf" not in fig:
            continue
        fl = fig.get("floor")
        floor_cell, ratio = "-", "-"
        if fl:
            floor_cell = f"{ms(fl['floor_s'])} {fl.get('bound', 'sum')}"
            if "combined" in fl:
                floor_cell += f"; one pass {ms(fl['combined']['floor_s'])}"
        if "niyama_over_floor" in fig:
            ratio = f"{fig['niyama_over_floor']:.2f}x"
            if "niyama_over_combined_floor" in fig:
                ratio += f"; {fig['niyama_over_combined_floor']:.2f}x"
            if "over_greedy" in fig:
                ratio += f"; {fig['over_greedy']:.3f}x greedy"
        rows.append((name, show(fig.get("niyama"), fig["kind"]), show(fig.get("hf"), fig["kind"]), floor_cell,
                     ratio, target_cell(name, fig)))
    o = results.get("overhead")
    if o:
        host = o.get("host_critical_s", o.get("overhead_s"))
        rows.append(("cpu overhead", o.get("error") or f"{ms(host)}/step at {o['running']}",
                     "-", "-", "-", target_cell("cpu overhead", o)))
    off = results.get("offline")
    if off:
        cell = (f"{tok_s(off['processed_tok_s'])} processed, {tok_s(off['output_tok_s'])} out"
                + ("" if off["status"] == "finished" else " (partial)"))
        rows.append(("offline", cell, "-", "-", "-", target_cell("offline", off)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", help="engine attention backend (auto, triton, torch-reference); "
                                        "default: the engine's")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--kv-tokens", type=int, help="KV cache of the timing engine (default 300000; quick 16384)")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--offline-requests", type=int, help="default 1000 (quick: 20)")
    ap.add_argument("--offline-budget-s", type=float, default=210.0, help="stop the offline run after this long")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--offline-profile", default=None,
                    help="batch-time profile of the offline run's engine (default: the engine's default)")
    ap.add_argument("--offline-sampling", default="greedy",
                    help=f"the offline run's sampling: {', '.join(SAMPLING_PRESETS)} or a mix's JSON file")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/engine_bench.json")
    args = ap.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if args.skip_offline:
        sections.discard("offline")
    if args.skip_hf:
        sections.discard("hf")
    args.device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    shape, dtype = SHAPES[args.shape], parse_dtype(args.dtype)

    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"env": environment(args), "args": {**vars(args), "device": str(args.device)},
               "sizes": dataclasses.asdict(sizes), "shape": shape.describe(), "figures": make_figures(sizes)}

    def save():
        out.write_text(json.dumps(results, indent=1))

    print(f"engine bench: {args.shape} in {args.dtype} on {results['env']['device']}; sections "
          f"{','.join(s for s in SECTIONS if s in sections)}", flush=True)
    if "ceilings" in sections:
        ceilings = results["ceilings"] = measure_ceilings(sizes, args.device, dtype)
        for fig in results["figures"].values():
            fig["floor"] = figure_floor(fig, shape, dtype_size(dtype), ceilings)
        print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), GEMM "
              f"{ceilings['gemm_flops_per_s'] / 1e12:.1f} TFLOP/s ({time.perf_counter() - t_start:.0f} s)", flush=True)
        save()
    if sections & set(ENGINE_SECTIONS):
        run_engine_sections(args, sizes, sections, results, save)
        free_memory(args.device)
        print(f"niyama steps done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if "hf" in sections:
        try:
            run_hf_section(args, sizes, shape, results, save)
        except Exception as e:      # the peer is a comparison: a transformers API change must not end the run
            results["hf_error"] = f"{type(e).__name__}: {e}"
            print(f"transformers failed: {results['hf_error']}", flush=True)
        free_memory(args.device)
        print(f"transformers done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if "offline" in sections:
        # default settings: the KV cache from free memory, the default policy and batch-time profile
        engine = make_engine(args, **({"profile": args.offline_profile} if args.offline_profile else {}))
        results["offline_engine"] = engine_info(engine)
        results["offline"] = measure_offline(engine, sizes, args.offline_requests or sizes.offline_requests,
                                             args.offline_budget_s, SamplingMix.parse(args.offline_sampling))
        del engine
        free_memory(args.device)
        off = results["offline"]
        print(f"offline: {off['status']}: {off['wall_s']:.3g} s, {tok_s(off['output_tok_s'])} generated, "
              f"{tok_s(off['processed_tok_s'])} processed ({time.perf_counter() - t_start:.0f} s); "
              f"profile {off.get('profile')}, steps {off.get('step_kinds')}", flush=True)
    finish_figures(results)
    results["wall_s"] = time.perf_counter() - t_start
    save()
    print("\n" + table(results), flush=True)
    print(f"\nwrote {out} ({results['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
