"""Every message that crosses a process boundary, as a declared type.

Three boundaries carry them:
- the server's HTTP process <-> its engine process (`server/engine_client.py` <-> `server/engine_core.py`);
- tensor-parallel rank 0 <-> its worker processes (`engine/tensor_parallel.py` <-> `engine/tp_worker.py`);
- the Ray Serve ingress <-> its engine replicas (`server/ray_serve.py`, `server/remote_engine.py`).

Messages are NamedTuples: typed and immutable. Receivers dispatch on the type (`match msg: case
AddRequest(): ...`). The one message sent every engine step, `StepOutputs`, crosses the pipe in a plain-tuple
form (`to_wire` / `from_wire`): pickled as objects it cost ~3x the string-tagged tuple it replaced, in this
form it costs the same (`benchmarks/ipc_bench.py` measures all of them at 1-512 running requests). Each
boundary's handshake carries `VERSION` (`Ready.version`, `WorkerSpec.version`): a process started from
another install is refused with a clear error instead of failing on a field it does not know. Bump it when
a message changes shape.

Importable without the server's dependencies: the GPU machine's engine uses it.
"""

from __future__ import annotations

from typing import NamedTuple

VERSION = 1


def check_version(version: int, peer: str) -> None:
    """Refuse a peer that speaks another version of these messages."""
    if version != VERSION:
        raise RuntimeError(f"{peer} speaks engine message version {version}, this process {VERSION}: both must "
                           "run the same niyama install")


# --- HTTP side -> engine core (read between steps) ----------------------------------------------------------
class AddRequest(NamedTuple):
    rid: int                  # the request's id, the same in the HTTP process, the engine and its Request
    prompt_ids: list[int]
    params: object            # engine.sampling.SamplingParams
    tier: object              # qos.Tier
    priority: object          # qos.Priority
    arrival: float            # time.monotonic() when it reached the API


class Abort(NamedTuple):
    rid: int
    reason: str = "abort"     # "abort": the client left; "stop": a stop string ended the text


class ReportLoad(NamedTuple):
    period_s: float           # send a LoadReport at most this often while the engine has work


class Shutdown(NamedTuple):
    pass


# --- engine core -> HTTP side ---------------------------------------------------------------------------------
class EngineInfo(NamedTuple):
    """What the HTTP side needs to know about the engine, sent once when it is ready."""
    model_name: str
    describe: str
    tokenizer_path: str | None
    eos_token_ids: tuple[int, ...]
    max_position: int
    vocab_size: int
    kv_blocks: int
    kv_tokens: int            # usable KV tokens (blocks less the watermark)
    sampling_defaults: dict


class Ready(NamedTuple):
    info: EngineInfo
    version: int = VERSION


class Fatal(NamedTuple):
    message: str              # the model did not load; the process exits


class Output(NamedTuple):
    """A request's end: every request the engine accepts gets exactly one (a finish reason or an error), also
    when it was aborted; the HTTP side records its metrics from it."""
    rid: int
    token_ids: list[int]              # tokens not sent yet
    finish_reason: str | None = None  # "stop", "length", "abort"; None with `error`
    relegated: bool = False           # the scheduler relegated it
    violated: bool = False            # it missed its tier's target (TTFT or TTLT)
    error: str | None = None          # the request failed; `status` is the HTTP status to send
    status: int = 500
    retry_after_s: int | None = None  # a rejected request may try again after this long
    logprobs: list | None = None      # the log-probabilities of `token_ids`, if the request asked for them


class StepRecord(NamedTuple):
    """What one engine step did, for the server's metrics."""
    duration_s: float
    predicted_s: float                # what the scheduler planned it to take (BatchPlan.predicted_s)
    budget: int | None                # the token budget, if the step had prefills
    tokens: int
    started: list                     # [(tier name, seconds queued, prompt tokens, cached prompt tokens)] of the
                                      # requests whose prefill started in this step (re-prefills not counted)
    relegated: list                   # [tier name] of requests relegated in this step
    preempted: int


class LoadReport(NamedTuple):
    """What a router weighs a replica by (`LLMEngine.load_report`)."""
    time: float                       # time.time() on the replica when it was made
    prefill_tokens_per_s: float       # the scheduler's observed prefill rate
    ahead_s: dict                     # tier name -> seconds until a new 1-token request's first token here
    work_tokens: int                  # prompt tokens not prefilled + output tokens not made (to max_tokens)
    requests: int                     # requests in the engine
    kv_free_tokens: int               # KV tokens free for new work (the watermark kept back)
    decodes_late: bool = False        # some running decode is past its token deadline


class EngineStats(NamedTuple):
    """The engine's state after a step (`LLMEngine.stats`), plus what the core adds."""
    time: float                       # time.monotonic() when it was made
    kv_free: int                      # free KV blocks
    kv_blocks: int
    running: int                      # decoding, or prefilled in part
    waiting: int                      # queued, not started
    correction: dict | None           # online correction's ratios per kind of step (None: off)
    steps: list | tuple = ()          # [StepRecord] since the last message
    degraded: str | None = None       # why the engine is not fully healthy (KV blocks lost after a failure)
    admitted: list | tuple = ()       # rids of tier-rejecting requests admitted since the last message
    load: LoadReport | None = None    # when asked for (ReportLoad) and due
    kv_cached: int = 0                # KV blocks a later request could reuse (prefix cache), held or idle


class StepOutputs(NamedTuple):
    """One message per step (and after commands that changed something). rids[i] made tokens[i] in this step
    (a running request makes one token per step; two flat lists pickle ~10x cheaper than an object per
    request); logprobs[rid]: that token's log-probabilities, for requests that asked; each finished request's
    last tokens come in an Output."""
    rids: list[int]
    tokens: list[int]
    ends: list[Output]
    stats: EngineStats
    logprobs: dict

    # Sent every step, so it crosses the pipe as plain tuples: pickle reduces a NamedTuple through Python
    # calls (~1.5 us per object, 3 per message), which made the typed message ~4 us slower to send than the
    # string-tagged tuple it replaced; in this form it is cheaper than that was (benchmarks/ipc_bench.py).
    def to_wire(self) -> tuple:
        s = self.stats
        return (self.rids, self.tokens, self.ends, (*s[:6], [tuple(r) for r in s.steps], s.degraded, s.admitted,
                                                     None if s.load is None else tuple(s.load), s.kv_cached),
                self.logprobs)

    @classmethod
    def from_wire(cls, wire: tuple) -> "StepOutputs":
        rids, tokens, ends, s, logprobs = wire
        load = None if s[9] is None else LoadReport._make(s[9])
        stats = EngineStats(*s[:6], [StepRecord._make(r) for r in s[6]], s[7], s[8], load, s[10])
        return cls(rids, tokens, ends, stats, logprobs)


# --- tensor-parallel rank 0 <-> workers -------------------------------------------------------------------------
# rank 0 sends a WorkerSpec first (engine/tensor_parallel.py), then:
class PlanKV(NamedTuple):
    """Size the KV cache: plan_kv_cache runs forwards, so every rank runs them together."""
    utilization: float
    max_batch_tokens: int
    max_num_seqs: int
    graph_rows: int


class BuildCache(NamedTuple):
    """Allocate the KV cache and the runner (the triton backend's buckets, CUDA graphs if asked)."""
    num_blocks: int
    buckets: tuple
    graphs: bool
    max_batch_tokens: int


class Step(NamedTuple):
    """Run one forward on the step's inputs (rank 0 samples; a worker discards its result)."""
    ids: list[int]
    positions: list[int]
    slices: list                      # [(start, num_tokens, context_len, block_ids)]
    num_decodes: int
    sample_rows: list[int]


class Stop(NamedTuple):
    pass


# ... and a worker answers each with one of these; any exception is sent as WorkerFailed before it exits.
class WorkerStarted(NamedTuple):
    pass


class WorkerLoaded(NamedTuple):
    pass


class KVPlanned(NamedTuple):
    kv_tokens: int


class CacheBuilt(NamedTuple):
    pass


class WorkerFailed(NamedTuple):
    traceback: str


# --- Ray Serve ingress <-> engine replicas ---
# (server/ray_serve.py, server/remote_engine.py.) The request itself goes as `server.protocol.Generation` and its
# events as `server.engine_client.Event`; the routers' load view is `niyama.routing`'s.
class Route(NamedTuple):
    """What a router knows of one generation request (`niyama.routing`); the ingress sends it beside the request,
    and the replica dates the request's arrival from it."""
    tier: str                 # the tier's name ("custom" for explicit targets)
    interactive: bool         # the tier has a TBT target (qos avoids replicas whose decodes are late)
    prompt_tokens: int
    max_tokens: int
    first_token_s: float      # its first-token deadline (TTFT, or TTFT_eff), seconds after arrival
    sent_at: float            # time.time() when the ingress sent it (the simulator: its clock)
    age_s: float = 0.0        # seconds since it reached the ingress

    @property
    def work_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


class EventBatch(NamedTuple):
    """Replica -> ingress, one item of a request's stream: its events since the last item."""
    events: list              # [Event]; empty: a tier-rejecting request was admitted
    relegated: bool           # whether the scheduler relegated it; final once the last event is in


class ReplicaStatus(NamedTuple):
    """A replica's engine state, as /health and /replicas show it."""
    kv_free: int              # free KV blocks
    kv_blocks: int
    degraded: str | None      # why the engine is not fully healthy
    running: int
    waiting: int
    kv_cached: int = 0        # prefix-cached blocks, held or idle


class ReplicaReport(NamedTuple):
    """Replica -> board every report period (board -> ingress in `BoardEntry`s): what /health, /metrics and
    /replicas show."""
    pid: int
    engine_pid: int | None
    node: str                 # the Ray node's IP address
    status: ReplicaStatus
    load: LoadReport | None   # the engine's last load report, as its router sees it
    metrics: bytes            # the replica's Prometheus text


class BoardEntry(NamedTuple):
    """One replica on the board's snapshot (replica id -> BoardEntry)."""
    age_s: float              # seconds since its last report
    report: ReplicaReport
