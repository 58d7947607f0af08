"""A tensor-parallel worker process: rank r >= 1 of the group that tensor_parallel.py describes.

    python -m niyama.engine.tp_worker FD       # FD: its end of a pipe from rank 0 (TensorParallel starts it)

It receives a WorkerSpec (refused if its message version is not this install's), answers WorkerStarted,
joins the group, builds its rank's model as rank 0 builds its own, answers WorkerLoaded, then obeys rank 0's
messages (niyama/messages.py) in order:
    PlanKV       size the KV cache (plan_kv_cache runs forwards: every rank runs them together) -> KVPlanned
    BuildCache   allocate the KV cache and the runner (the triton backend's buckets, CUDA graphs captured as
                 rank 0 captures its own) -> CacheBuilt
    Step         run one forward on the step's inputs; the result is discarded (rank 0 samples)
    Stop         leave
Any exception is sent back as WorkerFailed (its traceback) before the process exits with code 1. It also
exits when rank 0 dies (its pipe closes, or, while it waits inside a collective, its parent process changes).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from ..messages import (BuildCache, CacheBuilt, KVPlanned, PlanKV, Step, Stop, WorkerFailed, WorkerLoaded,
                        WorkerStarted, check_version)


def exit_with_parent() -> None:
    """Leave at once if the process that started us goes away (even while a collective blocks)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="niyama-tp-parent", daemon=True).start()


class Worker:
    def __init__(self, spec, rank: int):
        import torch

        from .attention import TorchReference
        from .backends import make_backend
        from .engine import load_model, parse_dtype
        from .ops import make_ops
        from .tensor_parallel import Shard, TensorParallelOps

        self.spec = spec
        self.rank = rank
        self.device = spec.rank_device(rank)
        self.dtype = parse_dtype(spec.dtype)
        shard = Shard(spec.config, spec.size, rank)
        self.config = shard.config
        self.backend = make_backend(spec.attention, self.config, self.device, spec.max_num_seqs, spec.block_size)
        fast = not isinstance(self.backend, TorchReference)
        ops = TensorParallelOps(make_ops("triton" if fast else "torch"))
        self.model = load_model(spec.kind, spec.source, spec.config, self.dtype, self.device, ops, spec.seed, shard)
        self.executor = None
        self.num_steps = 0
        fail = os.environ.get("NIYAMA_TP_FAIL_AT_STEP")     # a test hook: fail on purpose at this step
        self.fail_at = int(fail) if fail else None
        torch.set_grad_enabled(False)

    def plan(self, utilization: float, max_batch_tokens: int, max_num_seqs: int, graph_rows: int) -> int:
        from .memory import plan_kv_cache

        return plan_kv_cache(self.model, self.backend, self.config, self.dtype, self.device, utilization,
                             max_batch_tokens, max_num_seqs, graph_rows, self.spec.block_size).kv_tokens

    def cache(self, num_blocks: int, buckets: tuple[int, ...], graphs: bool, max_batch_tokens: int) -> None:
        from .kv_cache import PagedKVCache
        from .runner import ModelExecutor

        kv = PagedKVCache(self.config, num_blocks, self.spec.block_size, self.dtype, self.device)
        self.executor = ModelExecutor(self.model, kv, self.backend, self.device)
        if buckets:
            self.executor.use_buckets(buckets, graphs)
            if self.device.type == "cuda":
                self.backend.warm_up(*kv.layer(0), max_batch_tokens)

    def step(self, msg: Step) -> None:
        from .tensor_parallel import unpack_step

        self.num_steps += 1
        if self.num_steps == self.fail_at:
            raise RuntimeError(f"injected fault at step {self.fail_at} (NIYAMA_TP_FAIL_AT_STEP)")
        self.executor.forward(unpack_step(msg))

    def serve(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except EOFError:           # rank 0 is gone
                return
            match msg:
                case Step():
                    self.step(msg)
                case PlanKV():
                    conn.send(KVPlanned(self.plan(*msg)))
                case BuildCache():
                    self.cache(*msg)
                    conn.send(CacheBuilt())
                case Stop():
                    if self.executor is not None:
                        self.executor.drop_graphs()
                    return
                case _:
                    raise ValueError(f"unknown command {type(msg).__name__}")


def main(fd: int) -> int:
    conn = Connection(fd)
    exit_with_parent()
    spec = conn.recv()
    try:
        import torch

        from .tensor_parallel import init_group

        check_version(spec.version, "rank 0")
        torch.set_num_threads(spec.num_threads)
        conn.send(WorkerStarted())
        init_group(spec, spec.rank)
        worker = Worker(spec, spec.rank)
        conn.send(WorkerLoaded())
        worker.serve(conn)
    except BaseException:
        try:
            conn.send(WorkerFailed(traceback.format_exc()))
        except OSError:
            pass
        return 1
    from .tensor_parallel import leave_group

    leave_group()
    return 0


if __name__ == "__main__":
    code = main(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)          # nothing left to tear down: skip the interpreter's slow exit (~1 s with torch)
