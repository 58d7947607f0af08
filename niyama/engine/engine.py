"""LLMEngine: the model, its KV cache, a scheduler and the replica loop, in one object.

    engine = LLMEngine()                                  # default: SmolLM2-135M on CPU
    seq = engine.add_request("Hello", SamplingParams(max_tokens=32, temperature=0))
    while not seq.finished:
        engine.step()
        print(seq.take_text(), end="")

The loop is the simulator's `Replica` with a wall clock and the
`ModelExecutor`: the scheduler decides, the model runs what it decided.
What a server needs beside the loop is here too (`stats`, `load_report`,
`add_step_hook`, `admit`, `abort_all`), so that nothing outside reaches into
the scheduler, the replica or the predictor.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from ..kv import BlockAllocator, TokenKeys
from ..messages import (BuildCache, CacheBuilt, EngineInfo, EngineStats, KVPlanned, LoadReport, PlanKV,
                        WorkerLoaded)
from ..predictor.online import OnlineCorrection
from ..qos import DeadlineRule, Priority, Tier, load_tiers
from ..replica import Replica, WallClock
from ..request import Phase, Request
from ..scheduler import make_scheduler, scheduler_config
from .attention import TorchReference
from .backends import make_backend
from . import profile_choice
from .calibrate import calibrate
from .config import ModelConfig
from .grammar import Grammars
from .cpu_threads import set_cpu_threads
from .kv_cache import DEFAULT_CPU_KV_TOKENS, PagedKVCache
from .memory import plan_kv_cache
from .model import LlamaModel, rope_inv_freq
from .ops import make_ops
from .runner import ModelExecutor
from .sampling import SamplingParams
from .sequence import Sequence
from .tensor_parallel import Shard, TensorParallel, TensorParallelOps, WorkerSpec, init_random_shard, shard_hf_tensors
from .tokenizer import load_tokenizer
from .weights import DEFAULT_MODEL, read_hf_tensors, resolve, sampling_defaults


log = logging.getLogger("niyama.engine")


@dataclass
class EngineConfig:
    model: str | None = None              # HF dir, .gguf file, shape name (dummy); None = the default model
    load_format: str = "auto"             # auto | hf | gguf | dummy
    device: str | None = None             # default: cuda if available, else cpu
    dtype: str | None = None              # default: bfloat16 on cuda, float32 on cpu
    kv_tokens: int | None = None          # KV cache size; default from GPU memory, or 32768 on cpu
    gpu_memory_utilization: float = 0.9   # GPU share for weights, the worst step, CUDA graphs and the KV cache
    attention: str = "auto"               # auto (triton on cuda, else torch-reference) | triton | torch-reference
    cuda_graphs: bool = True              # steps of <= 1024 tokens replay CUDA graphs (triton attention on cuda)
    policy: str = "niyama"
    policy_options: dict | None = None
    profile: str = "auto"                 # batch-time profile: auto (shipped for this GPU and model, else measured
                                          # here and cached), measure (always measure), a shipped name or a file
    online_correction: bool = True        # rescale the profile by the measured step times (predictor/online.py)
    tiers: str = "default"
    prefix_caching: bool = True           # requests share the KV of equal prompt prefixes (kv.py)
    max_num_seqs: int = 256
    seed: int = 0
    tensor_parallel_size: int = 1         # ranks: GPUs on cuda, processes on cpu (tensor_parallel.py)
    tokenizer: str | None = None          # tokenizer dir or tokenizer.json instead of the model's (dummy: its only one)
    chat_template: str | None = None      # Jinja text replacing the tokenizer's chat template


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig(**overrides)
        self.config = cfg
        t0 = time.perf_counter()
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        set_cpu_threads(self.device)        # before tensor parallelism splits the threads among its ranks
        auto = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = parse_dtype(auto if cfg.dtype in (None, "auto") else cfg.dtype)
        kind, source = resolve(cfg.model, cfg.load_format)
        model_config = source if kind == "dummy" else ModelConfig.from_file(source / "config.json")
        self.model_config: ModelConfig = model_config
        # before the weights: a tokenizer that does not fit the model is refused without a long load.
        # A dummy shape's EOS ids mean nothing to a borrowed tokenizer, so only its own count then.
        model_dir = None if kind == "dummy" else source
        self.tokenizer = load_tokenizer(model_dir, model_config.vocab_size, () if kind == "dummy" else
                                        model_config.eos_token_ids, cfg.tokenizer, cfg.chat_template)
        self.tokenizer_path = self.tokenizer.path if self.tokenizer else None
        self.model_name = f"dummy-{cfg.model}" if kind == "dummy" else cfg.model or DEFAULT_MODEL
        block_size = 16
        tp = cfg.tensor_parallel_size
        shard = Shard(model_config, tp, 0) if tp > 1 else None      # refuses a size that does not split the model
        if shard and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.tp = None
        if shard:     # the workers load their shards while this process loads its own
            self.tp = TensorParallel(WorkerSpec(
                kind, source if kind == "hf" else None, model_config, str(self.dtype).removeprefix("torch."),
                str(self.device), cfg.attention, cfg.max_num_seqs, block_size, cfg.seed, tp))
        try:
            self._start(kind, source, shard, block_size)
        except BaseException:
            self.close()
            raise
        self.load_time_s = time.perf_counter() - t0

    def _start(self, kind: str, source, shard: Shard | None, block_size: int) -> None:
        """Load this rank's model, size and allocate the KV cache, choose the batch-time profile."""
        cfg, model_config = self.config, self.model_config
        rank_config = shard.config if shard else model_config       # what this process computes
        backend = make_backend(cfg.attention, rank_config, self.device, cfg.max_num_seqs, block_size)
        fast = not isinstance(backend, TorchReference)
        ops = make_ops("triton" if fast else "torch")
        self.model = load_model(kind, source, model_config, self.dtype, self.device,
                                TensorParallelOps(ops) if shard else ops, cfg.seed, shard)
        if self.tp:
            self.tp.expect(WorkerLoaded)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else model_config.eos_token_ids
        # temperature / top_p / top_k for server requests that set none
        self.sampling_defaults = sampling_defaults(None if kind == "dummy" else source,
                                                   cfg.model in (None, "", "default", DEFAULT_MODEL))
        policy_options = {"max_num_seqs": cfg.max_num_seqs, **(cfg.policy_options or {})}
        # a rank's step time is its shard's: a tensor-parallel engine never takes a whole model's profile
        choice = profile_choice.choose(cfg.profile, rank_config, self.device, self.dtype,
                                       f"{backend.name} graphs={cfg.cuda_graphs} seqs={cfg.max_num_seqs}"
                                       + (f" tp={shard.size}" if shard else ""))
        max_batch_tokens = scheduler_config(cfg.policy, **policy_options).max_batch_tokens
        # under tensor parallelism every rank captures the same graphs, NCCL all-reduces inside
        graphs = fast and cfg.cuda_graphs and self.device.type == "cuda"
        buckets = ()
        if fast:
            from .cuda_graphs import bucket_sizes
            buckets = bucket_sizes(cfg.max_num_seqs)
        self.memory = None
        kv_tokens = cfg.kv_tokens
        if kv_tokens is None and self.device.type == "cuda":
            limits = (cfg.gpu_memory_utilization, max_batch_tokens, cfg.max_num_seqs,
                      buckets[-1] if graphs else 0)
            if self.tp:          # every rank runs the same worst steps (their all-reduces meet)
                self.tp.send(PlanKV(*limits))
            self.memory = self._together(lambda: plan_kv_cache(
                self.model, backend, rank_config, self.dtype, self.device, *limits, block_size))
            kv_tokens = self.memory.kv_tokens
            if self.tp:          # the rank with the least room decides
                kv_tokens = min([kv_tokens] + [r.kv_tokens for r in self.tp.expect(KVPlanned)])
        self.allocator = BlockAllocator.for_tokens(kv_tokens or DEFAULT_CPU_KV_TOKENS, block_size,
                                                   prefix_caching=cfg.prefix_caching)
        self.kv_cache = PagedKVCache(rank_config, self.allocator.num_blocks, self.allocator.block_size,
                                     self.dtype, self.device)
        grammars = Grammars(self.tokenizer.to_json() if self.tokenizer else None, model_config.vocab_size,
                            self.eos_token_ids)
        self.executor = ModelExecutor(self.model, self.kv_cache, backend, self.device, grammars)
        if self.tp:          # the workers build theirs alongside (graph captures meet in their all-reduces)
            self.tp.send(BuildCache(self.allocator.num_blocks, buckets, graphs, max_batch_tokens))
        if fast:
            self._together(lambda: self.executor.use_buckets(buckets, graphs))
            if self.device.type == "cuda":
                backend.warm_up(*self.kv_cache.layer(0), max_batch_tokens)
        if self.tp:
            self.tp.expect(CacheBuilt)
            self.executor.tp = self.tp
        self.calibration_rows: list[tuple] = []
        profile, self.profile_source = choice.profile, choice.why
        if profile is None:
            profile, self.calibration_rows = calibrate(
                self.executor, self.allocator, model_config.max_position, model_config.vocab_size,
                name=f"measured-{self.model_name}-{self.device.type}")
            profile_choice.remember(choice, profile)
        self.profile = profile
        # what the scheduler plans with: the profile, rescaled online by the measured steps (predictor/online.py)
        self.predictor = OnlineCorrection(profile) if cfg.online_correction else profile
        self.scheduler = make_scheduler(cfg.policy, self.predictor, **policy_options)
        self.replica = Replica(self.scheduler, self.executor, self.allocator, WallClock())
        if cfg.online_correction:
            self.add_step_hook(lambda plan, result, end: self.predictor.observe_plan(plan, result.duration_s))
        self.set_tiers(load_tiers(cfg.tiers), DeadlineRule())
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(cfg.seed)

    def _together(self, fn):
        """`fn()`, which runs collectives with the workers: their failure is raised as theirs."""
        return self.tp.run(fn) if self.tp else fn()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (an engine without them holds nothing that needs closing).
        Also done at interpreter exit; the workers leave by themselves if this process dies."""
        if getattr(self, "tp", None) is not None:
            if getattr(self, "executor", None) is not None and not self.tp.failed:
                self.executor.drop_graphs()      # (after a failure the GPU may be stuck in a graph's all-reduce)
            self.tp.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ----------------------------------------------------------
    def add_request(self, prompt: "str | list[int]", params: SamplingParams | None = None, *,
                    tier: "str | Tier | None" = None, priority: "str | Priority" = Priority.IMPORTANT,
                    arrival_s: float | None = None, detokenize: bool = True,
                    request_id: int | None = None) -> Sequence:
        """Queue a generation; `prompt` is text (tokenized as is) or token ids; `tier` a configured tier's
        name (default: the first) or a Tier with this request's own targets. `detokenize=False`: token ids
        only (the server makes text in its HTTP process; stop strings are then the caller's to apply).
        `request_id`: the caller's id for it (the server's, so that one id names it everywhere); default:
        the engine's next. `self.sequences[request_id]` is its sequence until it is handed out finished."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights): pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token ids must be in [0, {self.model_config.vocab_size}), got {bad[:3]}")
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.model_config.max_position
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context of {limit} tokens")
        if not isinstance(tier, Tier):     # a configured tier by name (a Tier object: per-request targets)
            name = tier or self.default_tier
            if name not in self.tiers:
                raise ValueError(f"unknown tier {name!r}; configured tiers: {', '.join(self.tiers)}")
            tier = self.tiers[name]
        if request_id is None:
            request_id = next(self._ids)
        elif request_id in self.sequences:
            raise ValueError(f"request id {request_id} is already in the engine")
        matcher = self.executor.grammars.matcher(params.grammar) if params.grammar is not None else None
        req = Request(request_id, self.now() if arrival_s is None else arrival_s, len(ids), params.max_tokens,
                      tier, self.rule, Priority.parse(priority), sampled=not params.plain_greedy)
        self.replica.add(req)      # raises if the KV cache could never hold it
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        seq = Sequence(req, ids, params, self.tokenizer if detokenize else None, self.eos_token_ids, seed)
        seq.matcher = matcher
        if self.allocator.prefix_caching:    # keyed by its own token lists: generated tokens' blocks cache too
            req.block_keys = TokenKeys((seq.prompt_ids, seq.output_ids), self.allocator.block_size)
        self.executor.add(seq)
        return seq

    def set_tiers(self, tiers: "tuple[Tier, ...]", rule: DeadlineRule) -> None:
        """The QoS tiers requests may name (the first is the default) and how they turn into deadlines."""
        self.tiers: dict[str, Tier] = {t.name: t for t in tiers}
        self.default_tier = tiers[0].name
        self.rule = rule

    def now(self) -> float:
        return self.replica.clock.now()

    def time_at(self, monotonic_s: float) -> float:
        """The engine clock's reading at `time.monotonic()` == `monotonic_s` (an arrival in another process)."""
        return self.replica.clock.at(monotonic_s)

    @property
    def has_work(self) -> bool:
        return self.replica.has_work

    @property
    def sequences(self) -> "dict[int, Sequence]":
        """Every request in the engine (queued, prefilling, decoding), by request id; read-only."""
        return self.executor.sequences

    def add_step_hook(self, hook, first: bool = False) -> None:
        """Call `hook(plan, result, end_s)` after every step (`plan.predicted_s`: what the scheduler expected;
        `result.duration_s`: what it took)."""
        self.replica.on_step.insert(0, hook) if first else self.replica.on_step.append(hook)

    def admit(self) -> None:
        """Admission control now, not at the next step: requests that arrived join the scheduler, and in a tier
        that rejects infeasible requests, those that cannot make their deadline finish rejected."""
        self.replica.admit_arrivals()

    def stats(self, steps=(), degraded: str | None = None, admitted=(), load: LoadReport | None = None) -> EngineStats:
        """The engine's state for a server's metrics, with what the server's loop adds (`EngineStats`' last
        fields). Built positionally: it is made every step (benchmarks/ipc_bench.py)."""
        kv, waiting = self.allocator, self.scheduler.waiting
        started = waiting.num_started
        return EngineStats(time.monotonic(), kv.num_free, kv.num_blocks, len(self.replica.decodes) + started,
                           len(waiting) - started, getattr(self.predictor, "ratios", None), steps, degraded,
                           admitted, load, kv.num_cached_blocks)

    def load_report(self) -> LoadReport:
        """What a router weighs this replica by: O(requests) and O(waiting) per tier, so a server sends it only
        on request and at most every few tenths of a second.

        ahead_s[tier]: seconds until a new request of that tier (1 token of prompt) would make its first token
            here, the scheduler's own `predicted_first_token_s`: the prefill work queued ahead of it in this
            policy's order (EDF / niyama: tighter tiers first) at the observed prefill rate;
        work_tokens: prompt tokens not prefilled yet plus output tokens not made yet (up to each max_tokens),
            over every request in the engine: its outstanding work;
        decodes_late: some running decode is past its token deadline (an interactive request avoids it)."""
        sched, kv, replica = self.scheduler, self.allocator, self.replica
        now = self.now()
        ahead = {name: sched.predicted_first_token_s(now, Request(-1, now, 1, 1, tier, self.rule)) - now
                 for name, tier in self.tiers.items()}
        work = 0
        for seq in self.sequences.values():
            req = seq.request
            work += req.num_remaining_prefill + max(0, req.max_output_tokens - len(seq.output_ids))
        late = bool(replica.decodes) and replica.decodes.min_deadline(replica.iteration) < now
        return LoadReport(time.time(), sched.admission_rate.tokens_per_s, ahead, work, len(self.sequences),
                          max(0, kv.num_free - kv.num_watermark_blocks) * kv.block_size, late)

    def info(self) -> EngineInfo:
        """What a server's HTTP side needs to know about the engine, once."""
        kv = self.allocator
        return EngineInfo(self.model_name, self.describe(), self.tokenizer_path, tuple(self.eos_token_ids),
                          self.model_config.max_position, self.model_config.vocab_size, kv.num_blocks,
                          (kv.num_blocks - kv.num_watermark_blocks) * kv.block_size, self.sampling_defaults)

    def check_blocks(self) -> None:
        """KV conservation (AssertionError if a block is lost or held twice)."""
        self.replica.check_blocks()

    def step(self) -> list[Sequence]:
        """Run one iteration (or wait for the next arrival); return the sequences that finished in it.
        Text is made after the step, so the measured step time is the model's alone."""
        self.replica.step()
        for seq in list(self.executor.sequences.values()):
            if seq.update_text():              # a stop string: stop it before the next step
                seq.finish("stop")
                self.replica.abort(seq.request)
        return self.take_finished()

    def take_finished(self) -> list[Sequence]:
        """Sequences that finished (or were aborted) since the last call, each handed out once: the engine
        keeps no list of them (a server runs for days)."""
        done = self.executor.take_released()
        for seq in done:
            if seq.request.rejected:           # admission control refused it at arrival
                seq.finish("rejected")
            seq.update_text()
        return done

    def abort_all(self) -> list[Sequence]:
        """Abort every request in the engine (after a failed step) and hand their sequences out; one that
        cannot be aborted is logged and still handed out."""
        for seq in list(self.sequences.values()):
            try:
                self.abort(seq)
            except Exception:
                log.exception("abort of request %s after a failed step", seq.request.request_id)
                self.executor.release(seq.request)
        return self.take_finished()

    def abort(self, seq: Sequence, reason: str = "abort") -> bool:
        """Stop a request wherever it is (queued, prefilling, decoding) and free its KV blocks; call between
        steps. Its sequence is handed out by the next `step` or `take_finished`. Returns False if it had already finished."""
        if seq.request.phase is Phase.DONE:
            return False
        seq.finish(reason)
        return self.replica.abort(seq.request)

    def generate(self, prompts: "list[str | list[int]]", params: SamplingParams | None = None) -> list[Sequence]:
        """Run prompts to completion together (offline batch); results in prompt order."""
        seqs = [self.add_request(p, params) for p in prompts]
        while any(not s.request.finish_s for s in seqs):
            self.step()
        return seqs

    def chat_prompt(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights)")
        return self.tokenizer.apply_chat_template(messages)

    def describe(self) -> str:
        kv_gib = self.kv_cache.nbytes / 2**30
        graphs = self.executor.graphs
        tp = (f"tensor parallel x{self.tp.size} ({'nccl' if self.device.type == 'cuda' else 'gloo'}), KV cache "
              f"and heads per rank; " if self.tp else "")
        return (f"{self.model_name}: {self.model_config.describe()}; {self.dtype} on {self.device}; {tp}"
                f"KV cache {self.allocator.num_blocks * self.allocator.block_size} tokens ({kv_gib:.2f} GiB); "
                f"attention {self.executor.backend.name}, "
                f"{f'{len(graphs.graphs)} CUDA graphs' if graphs else 'no CUDA graphs'}; "
                f"policy {self.config.policy}, batch-time profile {self.profile_source}"
                f"{', corrected online' if self.config.online_correction else ''}; loaded in {self.load_time_s:.1f} s"
                + (f"\nmemory plan: {self.memory.describe()}" if self.memory else ""))


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, ops=None) -> LlamaModel:
    """Allocate the model straight in `dtype` on `device` (no float32 copy of an 8B model)."""
    with torch.device("meta"):
        model = LlamaModel(config, ops)
    model = model.to(dtype).to_empty(device=device)
    model.inv_freq = rope_inv_freq(config).to(device)    # rotary frequencies stay float32
    return model.eval()


def load_model(kind: str, source, config: ModelConfig, dtype: torch.dtype, device: torch.device, ops, seed: int,
               shard: Shard | None = None) -> LlamaModel:
    """The model with its weights (`kind`, `source` from weights.resolve), or rank `shard.rank`'s part of it.
    Dummy weights are the same on every rank and the same as an unsharded model's with this seed."""
    model = build_model(shard.config if shard else config, dtype, device, ops)
    if kind == "dummy":
        if shard:
            init_random_shard(model, shard, seed)
        else:
            model.init_random(seed)
    elif shard:       # read on the host, only this rank's rows and columns go to the device
        model.load_hf_weights(shard_hf_tensors(read_hf_tensors(source, torch.device("cpu")), shard))
    else:
        model.load_hf_weights(read_hf_tensors(source, device))
    return model
