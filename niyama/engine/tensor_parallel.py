"""Tensor parallelism (Megatron-style) over N processes of one host.

Rank r of N holds, in every decoder layer:
- `qkv_proj` rows (and `qkv_bias`, the same rows): the q rows of its H/N query heads, then the k and the v
  rows of the KV heads those heads read: KV/N heads of its own when N <= KV; when N > KV (N a multiple of
  KV), the one KV head its query heads share, replicated on N/KV ranks;
- `o_proj`: the columns of its query heads;
- `gate_up_proj`: gate rows then up rows of its FFN slice (F/N each); `down_proj`: that slice's columns.
The embedding, the norms and lm_head are replicated (whole on every rank; logits are taken on rank 0 only).

A rank's model is a plain `LlamaModel` of `Shard.config` (H/N heads, its KV heads, F/N FFN), so attention,
RoPE and the paged KV cache need no change: each rank's cache holds its own KV heads. The outputs of o_proj
and down_proj are partial sums of the full ones, and the model hands every such output, and nothing else,
to `ops.add_rms_norm(x, delta, ...)` (the next layer's norms, or the final norm). So `TensorParallelOps`
all-reduces `delta` there: two all-reduces per layer, no change to the model.

Processes: rank 0 is the engine (scheduler, KV block manager, sampler); `TensorParallel` starts ranks
1..N-1 as worker processes (`tp_worker.py`), each loading and sharding the same weights. Every step rank 0
sends the step's inputs (token ids, positions, the requests' slices with their block tables) over a pipe
to every worker, which lays them out and runs the same forward, its logits discarded. The all-reduces run
over torch.distributed: gloo on CPU, NCCL on CUDA (rank r on cuda:r), rendezvous on a free localhost port.
A worker that fails sends its traceback back before it exits; rank 0 raises it as a TensorParallelError.
The messages both ways are niyama/messages.py's (WorkerSpec, carrying their version, goes first).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing import connection
from pathlib import Path

import torch
import torch.distributed as dist

from ..messages import VERSION, Step, Stop, WorkerFailed, WorkerStarted
from .attention import SeqSlice
from .config import ModelConfig

log = logging.getLogger("niyama.engine")

# Collectives and worker replies wait this long before giving up (a worker stuck, or killed under NCCL).
TIMEOUT_S = float(os.environ.get("NIYAMA_TP_TIMEOUT_S", 600))


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed (its traceback is in the message), or the group broke."""


# --- which rows and columns a rank holds ----------------------------------------------------
def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse a size that does not split this model's heads and FFN evenly."""
    if size < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {size}")
    h, kv, f = config.num_heads, config.num_kv_heads, config.intermediate_size
    problems = []
    if h % size:
        problems.append(f"its {h} attention heads")
    elif kv % size and size % kv:
        problems.append(f"its {kv} KV heads (the size must divide them or be a multiple of them)")
    if f % size:
        problems.append(f"its FFN size {f}")
    if problems:
        fits = [n for n in range(2, h + 1) if not h % n and not (kv % n and n % kv) and not f % n]
        raise ValueError(f"tensor parallel size {size} does not split this model evenly: "
                         f"{' and '.join(problems)}; sizes that do: {', '.join(map(str, fits)) or 'none but 1'}")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: which heads and FFN columns of the full model (`full`) it holds."""
    full: ModelConfig
    size: int
    rank: int

    def __post_init__(self):
        check_tensor_parallel(self.full, self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside tensor parallel size {self.size}")

    @property
    def q_heads(self) -> tuple[int, int]:
        """(first query head, count)."""
        n = self.full.num_heads // self.size
        return self.rank * n, n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """(first KV head, count): the KV heads this rank's query heads read."""
        c = self.full
        if self.size <= c.num_kv_heads:
            n = c.num_kv_heads // self.size
            return self.rank * n, n
        group = c.num_heads // c.num_kv_heads          # query heads per KV head
        return self.q_heads[0] // group, 1

    @property
    def ffn(self) -> tuple[int, int]:
        """(first FFN column, count)."""
        n = self.full.intermediate_size // self.size
        return self.rank * n, n

    @property
    def config(self) -> ModelConfig:
        """The shape of this rank's model."""
        return replace(self.full, num_heads=self.q_heads[1], num_kv_heads=self.kv_heads[1],
                       intermediate_size=self.ffn[1])

    def rows(self, part: str) -> tuple[int, int]:
        """(start, length) in rows of one projection: "q" (q_proj, o_proj's columns), "kv" (k_proj or v_proj),
        "ffn" (gate_proj or up_proj, down_proj's columns)."""
        d = self.full.head_dim
        if part == "ffn":
            return self.ffn
        start, n = self.q_heads if part == "q" else self.kv_heads
        return start * d, n * d


def shard_param(name: str, full: torch.Tensor, s: Shard) -> torch.Tensor:
    """This rank's part of the full model's parameter `name` (a LlamaModel name); replicated ones whole."""
    kind = name.rsplit(".", 1)[-1]
    c = s.full
    if kind in ("qkv_proj", "qkv_bias"):          # rows: q heads, k heads, v heads
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        (qs, qn), (ks, kn) = s.rows("q"), s.rows("kv")
        return torch.cat([full.narrow(0, qs, qn), full.narrow(0, q + ks, kn), full.narrow(0, q + kv + ks, kn)])
    if kind == "o_proj":
        return full.narrow(1, *s.rows("q"))
    if kind == "gate_up_proj":                    # rows: gate then up
        start, n = s.ffn
        return torch.cat([full.narrow(0, start, n), full.narrow(0, c.intermediate_size + start, n)])
    if kind == "down_proj":
        return full.narrow(1, *s.ffn)
    return full


# HF projection -> (which rows, the dimension its weight is split along); a bias is split along its only one
_HF_SPLITS = {"q_proj": ("q", 0), "k_proj": ("kv", 0), "v_proj": ("kv", 0), "o_proj": ("q", 1),
              "gate_proj": ("ffn", 0), "up_proj": ("ffn", 0), "down_proj": ("ffn", 1)}


def shard_hf_tensors(tensors: dict[str, torch.Tensor], s: Shard) -> dict[str, torch.Tensor]:
    """HF-named checkpoint tensors -> this rank's part of each (views), for `LlamaModel.load_hf_weights`."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        split = _HF_SPLITS.get(parts[-2]) if name.startswith("model.layers.") else None
        if split is None:
            out[name] = t
        else:
            part, dim = split
            out[name] = t.narrow(0 if parts[-1] == "bias" else dim, *s.rows(part))
    return out


def init_random_shard(model, s: Shard, seed: int) -> None:
    """Fill this rank's `model` with its part of exactly the weights that `LlamaModel.init_random(seed)`
    gives the full model, without the full model: init_random itself draws into full-size tensors handed
    out one parameter at a time on this device, and each is sliced into this rank's model once drawn.
    (So peak memory is the rank's model plus one full parameter: a 70B shape loads on 2 GPUs.)"""
    from .model import LlamaModel

    with torch.device("meta"):
        full = LlamaModel(s.full)
    mine = dict(model.named_parameters())
    dtype, device = model.embed.dtype, model.embed.device

    class OneFullParameterAtATime:
        embed = model.embed                 # init_random seeds its generator on this device

        def named_parameters(self):
            for name, meta in full.named_parameters():
                t = torch.empty(meta.shape, dtype=dtype, device=device)
                yield name, t                       # init_random fills it before asking for the next
                mine[name].copy_(shard_param(name, t, s))

    LlamaModel.init_random(OneFullParameterAtATime(), seed)


class TensorParallelOps:
    """The model's elementwise ops with one all-reduce: every `delta` the model adds to the residual stream
    (o_proj's and down_proj's outputs) is a partial sum on each rank."""

    def __init__(self, base, group=None):
        self.base = base
        self.group = group
        self.name = f"{base.name}+all-reduce"

    def __getattr__(self, name):              # rope_state, rope_qkv, silu_mul: the base ops' own
        return getattr(self.base, name)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
        if delta is not None:
            dist.all_reduce(delta, group=self.group)
        return self.base.add_rms_norm(x, delta, weight, eps)


# --- processes ----------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """What a worker needs to build its rank's model and runner as rank 0 builds its own."""
    kind: str                       # "hf" or "dummy" (weights.resolve)
    source: Path | None             # the HF directory (hf)
    config: ModelConfig             # the full model's shape
    dtype: str
    device: str                     # rank 0's device: "cpu" or "cuda:i" (rank r gets cuda:i+r)
    attention: str
    max_num_seqs: int
    block_size: int
    seed: int
    size: int
    port: int = 0
    rank: int = 0
    num_threads: int = 1            # CPU threads per rank
    timeout_s: float = TIMEOUT_S
    version: int = VERSION          # of niyama/messages.py: a worker from another install refuses to start

    def rank_device(self, rank: int) -> torch.device:
        d = torch.device(self.device)
        return d if d.type != "cuda" else torch.device("cuda", (d.index or 0) + rank)


def init_group(spec: WorkerSpec, rank: int) -> None:
    """Join the all-reduce group: gloo on CPU, NCCL on CUDA (this rank's GPU)."""
    device = spec.rank_device(rank)
    kw = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{spec.port}",
                            rank=rank, world_size=spec.size, timeout=timedelta(seconds=spec.timeout_s), **kw)


def leave_group() -> None:
    """Leave the all-reduce group (after dropping any CUDA graph that captured its all-reduces: NCCL waits for
    those to go first; destroy and abort both hung on 2 H200s while they lived). NCCL's communicators are
    aborted, which waits for no peer (a peer may be gone)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def pack_step(step) -> bytes:
    """What a worker needs of a step (runner.StepInputs, less the sequences), as one message, pickled once
    for every worker."""
    slices = [(s.q_start, s.q_len, s.context_len, s.block_ids) for s in step.slices]
    return pickle.dumps(Step(step.ids, step.positions, slices, step.num_decodes, step.sample_rows),
                        protocol=pickle.HIGHEST_PROTOCOL)


def unpack_step(msg: Step):
    from .runner import StepInputs

    return StepInputs(msg.ids, msg.positions, [SeqSlice(*s) for s in msg.slices], msg.num_decodes,
                      msg.sample_rows, [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallel:
    """Rank 0's side of the group: starts the workers, sends them commands and steps, reports their failures,
    shuts them down. One per process (torch.distributed's default group)."""

    def __init__(self, spec: WorkerSpec):
        if dist.is_initialized():
            raise ValueError("this process already belongs to a tensor-parallel group (close the other engine)")
        device = spec.rank_device(0)
        if device.type == "cuda" and (device.index or 0) + spec.size > torch.cuda.device_count():
            raise ValueError(f"tensor parallel size {spec.size} needs {spec.size} GPUs from {device}; "
                             f"this machine has {torch.cuda.device_count()}")
        # CPU ranks share the cores: with more threads than cores, one rank's idle OpenMP threads spin while
        # another computes (a tiny model's step measured 14x slower on 2 cores), so each rank gets cores / N
        self.threads_before = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(max(1, self.threads_before // spec.size))
        self.spec = replace(spec, port=free_port(), num_threads=torch.get_num_threads())
        self.size = spec.size
        self.failed = False
        self.closed = False
        self.errors: dict[int, str] = {}
        self.failure = threading.Event()
        self.replies = {r: queue.Queue() for r in range(1, self.size)}
        self.procs: dict[int, subprocess.Popen] = {}
        self.conns: dict[int, connection.Connection] = {}
        env = dict(os.environ)
        # the workers import this package from where rank 0 did, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                          env.get("PYTHONPATH")]))
        try:
            for rank in range(1, self.size):
                ours, theirs = connection.Pipe()
                self.procs[rank] = subprocess.Popen(
                    [sys.executable, "-m", "niyama.engine.tp_worker", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), env=env)
                theirs.close()
                ours.send(replace(self.spec, rank=rank))
                self.conns[rank] = ours
            self.watcher = threading.Thread(target=self._watch, name="niyama-tp-watch", daemon=True)
            self.watcher.start()
            atexit.register(self.close)
            self.expect(WorkerStarted)      # every worker got this far before rank 0 waits at the rendezvous
            init_group(self.spec, 0)
        except BaseException:
            self.close()
            raise

    # --- messages from the workers (one thread reads them all) ---------------------------------
    def _watch(self) -> None:
        by_conn = {c: r for r, c in self.conns.items()}
        live = list(self.conns.values())
        while live:
            for conn in connection.wait(live):
                rank = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    live.remove(conn)
                    if not self.closed and rank not in self.errors:
                        code = self._exit_code(rank)
                        self._fail(rank, f"worker {rank} exited (code {code}) without a word")
                    continue
                if isinstance(msg, WorkerFailed):
                    self._fail(rank, msg.traceback)
                else:
                    self.replies[rank].put(msg)

    def _exit_code(self, rank: int):
        try:
            return self.procs[rank].wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def _fail(self, rank: int, text: str) -> None:
        self.errors[rank] = text
        self.failure.set()
        for replies in self.replies.values():        # whoever waits for any worker's reply stops waiting
            replies.put(WorkerFailed(""))
        log.error("tensor-parallel worker %d failed:\n%s", rank, text)

    def error(self) -> TensorParallelError:
        """The workers' failures as one exception: each one's last line first, then its traceback."""
        self.failed = True
        parts = []
        for rank, text in sorted(self.errors.items()):
            last = text.strip().splitlines()[-1] if text.strip() else "no message"
            detail = f"\n{text}" if "\n" in text.strip() else ""          # a traceback
            parts.append(f"tensor-parallel worker {rank} failed: {last}{detail}")
        return TensorParallelError("\n".join(parts) + "\nthe engine cannot go on; close it and start a new one")

    # --- commands -------------------------------------------------------------------------------
    def send(self, msg) -> None:
        data = msg if isinstance(msg, bytes) else pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in self.conns.items():
            try:
                conn.send_bytes(data)
            except OSError:
                self.failure.wait(5)       # its error message may be on the way
                if not self.errors:
                    self.errors[rank] = f"worker {rank} is gone (its pipe is closed)"
                raise self.error() from None

    def expect(self, kind: type, timeout_s: float | None = None) -> list:
        """Each worker's next message, which must be a `kind` (a reply type of niyama/messages.py); returns
        them in rank order."""
        out = []
        deadline = time.monotonic() + (timeout_s or self.spec.timeout_s)
        for rank, replies in self.replies.items():
            try:
                msg = replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TensorParallelError(f"tensor-parallel worker {rank} sent no {kind.__name__} within "
                                          f"{timeout_s or self.spec.timeout_s:.0f} s") from None
            if isinstance(msg, WorkerFailed):
                raise self.error()
            if not isinstance(msg, kind):
                raise TensorParallelError(f"tensor-parallel worker {rank} sent {type(msg).__name__}, "
                                          f"not {kind.__name__}")
            out.append(msg)
        return out

    def check(self) -> None:
        if self.errors or self.failed:
            raise self.error()

    def run(self, fn):
        """`fn()` on rank 0 while the workers do their part: a worker's failure, seen here as a broken
        collective, is raised with the worker's own error."""
        self.check()
        try:
            return fn()
        except Exception as e:
            self.failed = True
            if self.failure.wait(10):           # a worker's error explains it
                raise self.error() from e
            raise

    def run_step(self, step, forward):
        """Send `step` to the workers, then run rank 0's part of it, `forward(step)`."""
        self.check()
        self.send(pack_step(step))
        return self.run(lambda: forward(step))

    def wait_gpu(self) -> None:
        """Wait for this GPU's work so far, watching the workers meanwhile. On NCCL a collective whose peer
        died waits on the GPU (until NCCL's own timeout ends the process); this raises the worker's error."""
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            if self.errors:
                raise self.error()
            time.sleep(0)

    # --- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (politely, then by signal) and leave the group. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        for conn in self.conns.values():
            try:
                conn.send(Stop())
            except OSError:
                pass
        grace = 2 if self.failed else 10      # after a failure a worker may sit in a collective that never ends
        for rank, proc in self.procs.items():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if getattr(self, "watcher", None) is not None:
            self.watcher.join(timeout=5)          # it ends once every worker's pipe has closed
        if not getattr(self, "watcher", None) or not self.watcher.is_alive():
            for conn in self.conns.values():
                conn.close()
        leaving = threading.Thread(target=leave_group, name="niyama-tp-leave", daemon=True)
        leaving.start()
        leaving.join(30)
        if leaving.is_alive():
            log.warning("tensor parallel: leaving the process group did not finish in 30 s; going on without")
        torch.set_num_threads(self.threads_before)
