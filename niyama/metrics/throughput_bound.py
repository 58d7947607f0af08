"""Throughput bound: the most requests per second one replica could finish on a trace, by its batch-time profile.

No simulation: the bounds follow from the mean request and `profile.batch_time`, called with the simulator's
features (`BatchPlan`: prefill tokens, decodes, the sum of the decodes' contexts, the sum of the chunks' starts).

The mean request, from a seeded sample of the trace drawn as the simulator draws it (`make_workload`: N
requests, default 20,000, seed 0; rows shuffled, or drawn with replacement when N exceeds the trace):
    P_r = prompt tokens; C_r = its prefix served from the prefix cache (0 without prefix block ids, or with
    caching off: the most a cache of the replica's KV size could serve, evicting by Belady's rule, which knows
    the future, so no cache of that size serves more: workload/reuse.py); U_r = P_r - C_r, the prefill computed;
    D_r = output tokens - 1 (the prefill's last chunk emits the first token; the request then decodes in D_r
    steps, its k-th decode attending P_r + k tokens, as `RunningDecodes.context_sum` counts);
    P = mean U_r (the prefill work), D = mean D_r;
    Cd = sum_r (D_r P_r + D_r (D_r + 1) / 2) / sum_r D_r     the context of a mean decode token (0 if no decodes);
    Cp(c) = (c^2 * sum_r m_r (m_r - 1) / 2 + c * sum_r m_r C_r) / sum_r U_r,  m_r = ceil(U_r / c)
        the mean prefill context of a step that carries c prefill tokens when every prompt is cut into c-token
        chunks after its cached prefix: chunk j starts after C_r + j*c tokens in the KV, the step's feature is
        the sum of its chunks' starts, and sum_r U_r / c such steps carry all of them.

Step in the trace's mix, of T total tokens (T <= the budget B = 2552, niyama's largest chunk candidate):
    d = T * D / (P + D) decodes, p = T - d prefill tokens; if d > max_num_seqs: d = max_num_seqs and
    p = d * P / D (the step is then not full: more prefill would outrun the decodes; p < T - d follows);
    t = batch_time(p, d, d * Cd, Cp(p))        (fractional p and d: every profile takes them)
    QPS = p / (t P) = d / (t D)                (p / (t P) when D = 0)
The chunk is the step's prefill p, not B: a step of p prefill tokens cannot hold a longer chunk. As batch_time
is affine in the two contexts at a fixed (p, d), t is also the mean time of the steps the contexts average over.

Bound (2552-chunk): the replica runs nothing but such steps of T = B tokens.

Absolute bound: the cheapest the profile allows, over step sizes and groupings; the largest QPS of
    (a) mixed: steps in the trace's mix at the best T in 1..B (every integer);
    (b) separate: prefill-only steps of the best chunk c in 1..B, s_p = min_c batch_time(c, 0, 0, Cp(c)) / c
        seconds per prompt token, and decode-only steps of the best batch d in 1..min(max_num_seqs, B),
        s_d = min_d batch_time(0, d, d * Cd, 0) / d per decode token; QPS = 1 / (P s_p + D s_d);
    (c) time-shared: two step shapes (p, d), p + d <= B, d <= max_num_seqs, each run for the share of the
        time that makes their sum the trace's mix (dynamic chunking varies the step like this). A shape does
        p / t prompt and d / t decode tokens per second (t with contexts d * Cd and Cp(p)); the QPS is the
        largest q with q * (P, D) in the convex hull of all shapes' rates and 0: where the ray along (P, D)
        leaves the hull. Shapes are scanned on a grid (p every 16, d every 8, plus the winners of (a) and
        (b)), then every integer shape within one grid step of the winning pair; (c) >= (a) and (b).

Paced bound: the bound when no step may take longer than the pace of the tightest interactive tier (its TBT,
e.g. 50 ms): a replica whose interactive decodes never wait longer than their pace between tokens runs only
such steps while any of them decodes. The best mixed step with t <= pace, T in 1..B (option (a) with a time
limit). A replica can beat it only by spending slack (a first token that came early lets the decodes of that
request fall behind the pace for a while) or in stretches without interactive decodes: it is the ceiling of a
policy that keeps every interactive token on time while interactive decodes run all the time.

What it leaves out: KV capacity (a decode holds its context: d decodes need about d * Cd KV tokens; ShareGPT's
Cd ~ 2,700 lets 440K tokens hold ~160, not 256: pass max_num_seqs=160 to see), the slot a prefill in progress
takes beside max_num_seqs decodes, deadlines, noise, and mixed chunk sizes' contexts (each shape is charged
Cp of its own p).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from ..predictor import load_profile
from ..qos import load_tiers
from ..scheduler.base import SchedulerConfig
from ..scheduler.niyama import CHUNK_CANDIDATES
from ..workload import load_trace, make_workload
from ..workload.reuse import cached_prefixes

BUDGET = CHUNK_CANDIDATES[-1]                      # 2552: niyama's largest step
MAX_NUM_SEQS = SchedulerConfig.max_num_seqs        # 256
NUM_REQUESTS = 20_000                              # default sample of the trace
GRID_PREFILL, GRID_DECODES = 16, 8                 # coarse grid of time-shared shapes, refined to integers


@dataclass(frozen=True)
class Lengths:
    """A trace sample's per-request token counts."""

    prompt_tokens: np.ndarray      # P_r
    decode_tokens: np.ndarray      # D_r: output tokens - 1
    cached_tokens: np.ndarray | None = None    # C_r: its prefix served from the prefix cache (None: 0)

    def __post_init__(self):
        if len(self.prompt_tokens) == 0 or len(self.prompt_tokens) != len(self.decode_tokens):
            raise ValueError("need one prompt and one decode count per request, at least one request")
        if (self.prompt_tokens < 1).any() or (self.decode_tokens < 0).any():
            raise ValueError("prompts need >= 1 token and decodes >= 0")
        if self.cached_tokens is not None and not (0 <= self.cached_tokens).all() & \
                (self.cached_tokens < self.prompt_tokens).all():
            raise ValueError("a cached prefix must be shorter than its prompt")

    @classmethod
    def of(cls, prompts, outputs, cached=None) -> "Lengths":
        """From prompt and output token counts, as a trace has them (and the prefix each finds cached)."""
        return cls(np.asarray(prompts, dtype=np.float64), np.asarray(outputs, dtype=np.float64) - 1,
                   None if cached is None or not np.any(cached) else np.asarray(cached, dtype=np.float64))

    @property
    def num_requests(self) -> int:
        return len(self.prompt_tokens)

    @cached_property
    def computed_tokens(self) -> np.ndarray:
        """U_r: prompt tokens each request's prefill computes."""
        return self.prompt_tokens if self.cached_tokens is None else self.prompt_tokens - self.cached_tokens

    @cached_property
    def mean_prompt(self) -> float:
        """P: the mean prefill work (prompt less its cached prefix)."""
        return float(self.computed_tokens.mean())

    @cached_property
    def cached_pct(self) -> float:
        return 0.0 if self.cached_tokens is None else 100 * float(self.cached_tokens.sum() / self.prompt_tokens.sum())

    @cached_property
    def mean_decode(self) -> float:
        return float(self.decode_tokens.mean())

    @cached_property
    def _num_prompts_up_to(self) -> np.ndarray:
        """[x]: how many prefills compute at most x tokens, x = 0..the longest."""
        return np.cumsum(np.bincount(self.computed_tokens.astype(np.int64)))

    @cached_property
    def decode_context(self) -> float:
        """Cd: tokens a mean decode token attends."""
        p, d = self.prompt_tokens, self.decode_tokens
        total = d.sum()
        return float((d * p + d * (d + 1) / 2).sum() / total) if total else 0.0

    def prefill_context(self, chunk) -> np.ndarray | float:
        """Cp(chunk): the mean prefill context of a step of `chunk` prefill tokens (a number or an array).
        sum_r m_r (m_r - 1) / 2 = sum_{j >= 1} j * #{r: U_r > j * chunk}: prefill r has a chunk starting at
        j * chunk past its cached prefix for every j < m_r."""
        up_to = self._num_prompts_up_to
        longest, n = len(up_to) - 1, up_to[-1]
        out = []
        for c in np.atleast_1d(np.asarray(chunk, dtype=np.float64)):
            if not c > 0:
                raise ValueError("chunks must be > 0 tokens")
            j = np.arange(1, int(longest // c) + 1)
            starts = c * c * float(j @ (n - up_to[np.floor(j * c).astype(np.int64)]))
            if self.cached_tokens is not None:      # every chunk of request r also starts after C_r
                starts += c * float(np.ceil(self.computed_tokens / c) @ self.cached_tokens)
            out.append(starts)
        out = np.array(out) / self.computed_tokens.sum()
        return out if np.ndim(chunk) else float(out[0])


def request_lengths(trace: str, num_requests: int = NUM_REQUESTS, seed: int = 0,
                    output_tokens: int | None = None, kv_tokens: int | None = None) -> Lengths:
    """The lengths of `num_requests` requests of `trace` as `make_workload` draws them (`output_tokens`: the
    workload option fixing every output length); with `kv_tokens`, the prefixes a prefix cache of that size
    could serve at most (traces with prefix block ids; None: caching off)."""
    if num_requests < 1:
        raise ValueError("the bound needs at least one request")
    wl = make_workload(trace, 1.0, num_requests=num_requests, seed=seed, output_tokens=output_tokens)
    cached = cached_prefixes(wl.specs, wl.block_tokens, kv_tokens) if kv_tokens and wl.has_prefixes else None
    return Lengths.of([s.num_prompt_tokens for s in wl.specs], [s.num_output_tokens for s in wl.specs], cached)


@dataclass(frozen=True)
class Step:
    """One step shape and what running only it would give."""

    prefill_tokens: float
    decodes: float
    decode_context: float          # batch_time's feature: sum over decodes
    prefill_context: float         # batch_time's feature: sum of chunk starts, mean over steps
    time_s: float
    qps: float                     # requests per second if every step were this one

    @property
    def total_tokens(self) -> float:
        return self.prefill_tokens + self.decodes

    def describe(self) -> str:
        return f"{self.prefill_tokens:.0f}+{self.decodes:.0f} tokens, {self.time_s * 1e3:.1f} ms"


def mix_shape(lengths: Lengths, total: float, max_num_seqs: int) -> tuple[float, float]:
    """(p, d): a step of `total` tokens in the trace's mix, decodes capped at `max_num_seqs`."""
    mp, md = lengths.mean_prompt, lengths.mean_decode
    d = total * md / (mp + md)
    if d <= max_num_seqs:
        return total - d, d
    return max_num_seqs * mp / md, float(max_num_seqs)     # < total - max_num_seqs, as d > max_num_seqs


def step(profile, lengths: Lengths, p: float, d: float) -> Step:
    """Step (p, d) with the trace's contexts, and its QPS when run alone."""
    return _step(profile, lengths, p, d, lengths.prefill_context(p) if p else 0.0)


def mixed_step(profile, lengths: Lengths, total: float = BUDGET, max_num_seqs: int = MAX_NUM_SEQS) -> Step:
    return step(profile, lengths, *mix_shape(lengths, total, max_num_seqs))


def best_mixed_step(profile, lengths: Lengths, budget: int = BUDGET, max_num_seqs: int = MAX_NUM_SEQS,
                    max_time_s: float = math.inf) -> Step | None:
    """Option (a): the mixed step of the best size in 1..budget (that takes at most `max_time_s`; None if none
    does)."""
    shapes = [mix_shape(lengths, total, max_num_seqs) for total in range(1, budget + 1)]
    pctx = lengths.prefill_context([p for p, _ in shapes])
    steps = [s for s in (_step(profile, lengths, p, d, float(c)) for (p, d), c in zip(shapes, pctx))
             if s.time_s <= max_time_s]
    return max(steps, key=lambda s: s.qps, default=None)


@dataclass(frozen=True)
class Separate:
    """Option (b): prefill-only and decode-only steps, each at its cheapest size."""

    prefill_chunk: int
    prefill_s_per_token: float
    decode_batch: int
    decode_s_per_token: float
    qps: float


def separate_steps(profile, lengths: Lengths, budget: int = BUDGET, max_num_seqs: int = MAX_NUM_SEQS) -> Separate:
    chunks = np.arange(1, budget + 1)
    pctx = lengths.prefill_context(chunks)
    s_p, c = min((profile.batch_time(int(c), 0, 0, float(x)) / c, int(c)) for c, x in zip(chunks, pctx))
    dctx = lengths.decode_context
    s_d, d = min((profile.batch_time(0, d, d * dctx, 0) / d, d) for d in range(1, min(max_num_seqs, budget) + 1))
    work = lengths.mean_prompt * s_p + lengths.mean_decode * s_d
    return Separate(c, float(s_p), d, float(s_d), float(1 / work))


@dataclass(frozen=True)
class TimeShared:
    """Option (c): two step shapes, each run for its share of the time."""

    steps: tuple[Step, ...]         # one or two shapes
    time_shares: tuple[float, ...]  # fraction of the replica's time in each
    qps: float


def time_shared(profile, lengths: Lengths, budget: int = BUDGET, max_num_seqs: int = MAX_NUM_SEQS,
                extra: tuple[tuple[float, float], ...] = ()) -> TimeShared:
    """Option (c), scanned on the grid plus the `extra` shapes, then refined to every integer shape around the
    winners."""
    max_d = min(max_num_seqs, budget)
    ps = sorted(set(range(0, budget + 1, GRID_PREFILL)) | {budget})
    ds = sorted(set(range(0, max_d + 1, GRID_DECODES)) | {max_d})
    shapes = {(float(p), float(d)) for p in ps for d in ds if 0 < p + d <= budget} | set(extra)
    best, hull = _ray_exit(_steps(profile, lengths, shapes), lengths)
    near = {(float(p), float(d)) for s in best.steps
            for p in range(max(0, round(s.prefill_tokens) - GRID_PREFILL), round(s.prefill_tokens) + GRID_PREFILL + 1)
            for d in range(max(0, round(s.decodes) - GRID_DECODES), min(max_d, round(s.decodes) + GRID_DECODES) + 1)
            if 0 < p + d <= budget} - shapes
    return _ray_exit(hull + _steps(profile, lengths, near), lengths)[0]


def _steps(profile, lengths: Lengths, shapes) -> list[Step]:
    shapes = sorted(shapes)
    chunks = sorted({p for p, _ in shapes if p})
    pctx = dict(zip(chunks, lengths.prefill_context(chunks))) if chunks else {}
    return [_step(profile, lengths, p, d, float(pctx.get(p, 0.0))) for p, d in shapes]


def _step(profile, lengths: Lengths, p: float, d: float, pctx: float) -> Step:
    dctx = d * lengths.decode_context
    t = profile.batch_time(p, d, dctx, pctx)
    rates = [p / lengths.mean_prompt] + ([d / lengths.mean_decode] if lengths.mean_decode else [])
    return Step(p, d, dctx, pctx, t, min(rates) / t)


def _ray_exit(steps: list[Step], lengths: Lengths) -> tuple[TimeShared, list[Step]]:
    """Where the ray q * (P, D) leaves the convex hull of the steps' rates and 0: the best time-sharing; and
    the steps at the hull's vertices."""
    u = (lengths.mean_prompt, lengths.mean_decode)
    norm = u[0] ** 2 + u[1] ** 2

    def cross(v):
        return u[0] * v[1] - u[1] * v[0]

    rates = {(s.prefill_tokens / s.time_s, s.decodes / s.time_s): s for s in steps}
    hull = _hull([((0.0, 0.0), None)] + sorted(rates.items()))
    best = TimeShared((), (), 0.0)
    for v, s in hull:           # a vertex on the ray: one shape does the mix
        if s is not None and abs(cross(v)) <= 1e-12 * norm ** 0.5 * math.hypot(*v):
            q = (v[0] * u[0] + v[1] * u[1]) / norm
            if q > best.qps:
                best = TimeShared((s,), (1.0,), q)
    for (v1, s1), (v2, s2) in zip(hull, hull[1:] + hull[:1]):     # an edge the ray crosses: two shapes
        c1, c2 = cross(v1), cross(v2)
        if s1 is None or s2 is None or c1 * c2 >= 0:
            continue
        a = c1 / (c1 - c2)      # share of time in s2
        q = ((v1[0] + a * (v2[0] - v1[0])) * u[0] + (v1[1] + a * (v2[1] - v1[1])) * u[1]) / norm
        if q > best.qps:
            best = TimeShared((s1, s2), (1 - a, a), q)
    return best, [s for _, s in hull if s is not None]


def _hull(points):
    """Convex hull (monotone chain) of ((x, y), payload) items sorted by (x, y), counter-clockwise."""
    def half(items):
        out = []
        for item in items:
            while len(out) >= 2 and _turn(out[-2][0], out[-1][0], item[0]) <= 0:
                out.pop()
            out.append(item)
        return out

    lower, upper = half(points), half(points[::-1])
    return lower[:-1] + upper[:-1]


def _turn(a, b, c) -> float:
    """> 0 when a -> b -> c turns counter-clockwise."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


@dataclass(frozen=True)
class ThroughputBound:
    trace: str
    profile: str
    num_requests: int              # sample size the means come from
    max_num_seqs: int
    budget: int                    # B
    mean_prompt_tokens: float      # P
    mean_decode_tokens: float      # D
    decode_context: float          # Cd, per decode token
    step: Step                     # the bound's step: `budget` tokens in the trace's mix
    mixed: Step                    # option (a)
    separate: Separate             # option (b)
    shared: TimeShared             # option (c)
    pace_s: float | None = None    # the tightest interactive TBT (None: no interactive tier)
    paced: Step | None = None      # the paced bound's step (None: no pace, or no step fits it)
    cached_pct: float = 0.0        # prompt tokens served from the prefix cache (P counts only the rest)

    @property
    def qps(self) -> float:
        return self.step.qps

    @property
    def absolute_qps(self) -> float:
        return max(self.mixed.qps, self.separate.qps, self.shared.qps)

    @property
    def paced_qps(self) -> float | None:
        if self.pace_s is None:
            return None
        return self.paced.qps if self.paced is not None else 0.0

    @property
    def absolute_kind(self) -> str:
        """Which option gives the absolute bound (the simplest of those within 0.01% of it)."""
        for kind, q in (("mixed", self.mixed.qps), ("separate", self.separate.qps), ("time-shared", self.shared.qps)):
            if q >= self.absolute_qps * (1 - 1e-4):
                return kind

    @property
    def absolute_shape(self) -> str:
        kind = self.absolute_kind
        if kind == "mixed":
            return self.mixed.describe()
        if kind == "separate":
            s = self.separate
            return f"prefill {s.prefill_chunk} + decode {s.decode_batch}"
        return " | ".join(f"{share:.0%} {s.prefill_tokens:.0f}+{s.decodes:.0f}"
                          for s, share in zip(self.shared.steps, self.shared.time_shares))

    def to_dict(self) -> dict:
        return {"trace": self.trace, "profile": self.profile, "num_requests": self.num_requests,
                "max_num_seqs": self.max_num_seqs, "budget": self.budget,
                "mean_prompt_tokens": self.mean_prompt_tokens, "mean_decode_tokens": self.mean_decode_tokens,
                "decode_context": self.decode_context, "bound_qps": self.qps,
                "step": {**asdict(self.step), "total_tokens": self.step.total_tokens},
                "absolute_qps": self.absolute_qps, "absolute_kind": self.absolute_kind,
                "absolute_shape": self.absolute_shape,
                "mixed": asdict(self.mixed), "separate": asdict(self.separate),
                "time_shared": {"qps": self.shared.qps, "time_shares": list(self.shared.time_shares),
                                "steps": [asdict(s) for s in self.shared.steps]},
                "pace_s": self.pace_s, "paced_qps": self.paced_qps,
                "paced_step": None if self.paced is None else asdict(self.paced)}


def throughput_bound(profile, lengths: Lengths, trace: str = "", budget: int = BUDGET,
                     max_num_seqs: int = MAX_NUM_SEQS, pace_s: float | None = None) -> ThroughputBound:
    """The bounds of `lengths` under `profile` (any object with `batch_time` and `name`); the paced one when a
    `pace_s` is given."""
    if budget < 1 or max_num_seqs < 1:
        raise ValueError("the budget and max_num_seqs must be >= 1")
    fixed = mixed_step(profile, lengths, budget, max_num_seqs)
    mixed = best_mixed_step(profile, lengths, budget, max_num_seqs)
    sep = separate_steps(profile, lengths, budget, max_num_seqs)
    extra = ((mixed.prefill_tokens, mixed.decodes), (float(sep.prefill_chunk), 0.0), (0.0, float(sep.decode_batch)))
    shared = time_shared(profile, lengths, budget, max_num_seqs, extra)
    paced = None if pace_s is None else best_mixed_step(profile, lengths, budget, max_num_seqs, pace_s)
    return ThroughputBound(trace, getattr(profile, "name", str(profile)), lengths.num_requests, max_num_seqs, budget,
                           lengths.mean_prompt, lengths.mean_decode, lengths.decode_context, fixed, mixed, sep, shared,
                           pace_s, paced, lengths.cached_pct)


def tightest_pace(trace: str) -> float | None:
    """The smallest TBT among the interactive tiers a trace is served with (None if it has none)."""
    paces = [t.tbt_s for t in load_tiers(load_trace(trace).tiers) if t.interactive]
    return min(paces, default=None)


def trace_bound(trace: str, profile: str, max_num_seqs: int = MAX_NUM_SEQS, num_requests: int = NUM_REQUESTS,
                seed: int = 0, output_tokens: int | None = None, budget: int = BUDGET,
                kv_tokens: int | None = None) -> ThroughputBound:
    """`throughput_bound` of a trace (name or CSV) under a profile name, from the simulator's sample; `kv_tokens`:
    the replica's KV cache, whose prefix cache serves what it could at most (None: no prefix caching)."""
    lengths = request_lengths(trace, num_requests, seed, output_tokens, kv_tokens)
    return throughput_bound(load_profile(profile), lengths, trace, budget, max_num_seqs, tightest_pace(trace))
