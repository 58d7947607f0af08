"""Build a workload: arrival times x lengths from a trace x tiers and priorities.

Every random choice draws from its own seeded stream, so changing the load
changes only the arrival times, never which request is which tier.

Rows are drawn shuffled (traces hold bursts), except from a trace with
prefix block ids: there who reuses whose prefix depends on who came first,
so rows keep the trace's order and a workload holds at most one pass of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..qos import DeadlineRule, Priority, Tier, load_tiers, parse_mix, with_admission
from ..kv import TraceKeys
from ..request import Request
from . import arrivals as arrival_processes
from .traces import MOONCAKE_BLOCK_TOKENS, Trace, load_trace

DEFAULT_DURATION_S = 4 * 3600.0   # capacity runs span at least 4 hours of arrivals


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    tier: str
    priority: Priority = Priority.IMPORTANT
    sampled: bool = False      # drawn with temperature or penalties (the time model's per-row term)
    block_ids: tuple[int, ...] | None = None    # the trace's prefix block ids (Workload.block_tokens each)


@dataclass(frozen=True)
class Workload:
    name: str
    specs: list[RequestSpec]
    tiers: tuple[Tier, ...]
    rule: DeadlineRule
    long_prompt_threshold: int
    qps: float | None = None
    block_tokens: int = MOONCAKE_BLOCK_TOKENS   # prompt tokens per entry of a spec's block_ids

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def tier_by_name(self) -> dict[str, Tier]:
        return {t.name: t for t in self.tiers}

    @property
    def last_arrival_s(self) -> float:
        return self.specs[-1].arrival_s if self.specs else 0.0

    @property
    def has_prefixes(self) -> bool:
        return any(s.block_ids for s in self.specs)

    def requests(self, block_size: int = 16) -> list[Request]:
        """Fresh Request objects (a workload can be replayed many times); a spec's block ids become its
        requests' prefix-cache keys (for a KV cache of `block_size`-token blocks)."""
        tiers = self.tier_by_name
        out = []
        for i, s in enumerate(self.specs):
            req = Request(i, s.arrival_s, s.num_prompt_tokens, s.num_output_tokens, tiers[s.tier], self.rule,
                          s.priority, s.sampled)
            if s.block_ids:
                req.block_keys = TraceKeys(s.block_ids, s.num_prompt_tokens, s.num_prompt_tokens + s.num_output_tokens,
                                           i, block_size, self.block_tokens)
            out.append(req)
        return out


def make_workload(trace: "str | Trace", qps: float | None = None, *, num_requests: int | None = None,
                  duration_s: float | None = None, seed: int = 0, arrival: str = "poisson",
                  tiers: "str | tuple[Tier, ...] | None" = None, tier_mix: str | None = None,
                  low_priority_fraction: float = 0.0, diurnal_qps: tuple[float, float] | None = None,
                  diurnal_period_s: float = 900.0, output_len_pred: int | None = None,
                  output_tokens: int | None = None, on_infeasible: str | None = None) -> Workload:
    """Arrivals: `poisson` at `qps`; `trace` replays the trace's own arrival times
    (scaled to `qps` if given); `diurnal` alternates `diurnal_qps` (low, high).
    Size: `num_requests`, else enough to span `duration_s` (default 4 hours).
    `output_tokens` fixes every request's output length (1: prefill-only
    replicas); the predicted output length then defaults to it too.
    `on_infeasible`: admission control per tier (see `with_admission`)."""
    tr = load_trace(trace) if isinstance(trace, str) else trace
    tier_set = load_tiers(tiers or tr.tiers) if not isinstance(tiers, tuple) else tiers
    tier_set = with_admission(tier_set, on_infeasible)
    mix = parse_mix(tier_mix, len(tier_set))
    if not 0 <= low_priority_fraction <= 1:
        raise ValueError("low_priority_fraction must be in [0, 1]")
    if output_tokens is not None and output_tokens < 1:
        raise ValueError("output_tokens must be >= 1")
    if output_len_pred is None:
        output_len_pred = tr.output_len_pred if output_tokens is None else output_tokens
    rule = DeadlineRule(output_len_pred=output_len_pred)
    rng_arrival, rng_length, rng_tier, rng_priority = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    times = _arrival_times(tr, arrival, qps, num_requests, duration_s, diurnal_qps, diurnal_period_s, rng_arrival)
    if tr.block_ids is not None:
        times = times[:len(tr)]
    n = len(times)
    if n == 0:
        raise ValueError("the workload has no requests; raise --qps, --requests or the duration")
    if tr.block_ids is not None:
        rows = np.arange(n)                          # in order, once: the reuse depends on it
    elif n <= len(tr):
        rows = rng_length.permutation(len(tr))[:n]   # shuffled, as the artifact does: traces hold bursts
    else:
        rows = rng_length.integers(0, len(tr), n)  # more requests than rows: sample with replacement
    tier_idx = rng_tier.choice(len(tier_set), size=n, p=mix)
    low = rng_priority.random(n) < low_priority_fraction
    outputs = tr.output_tokens[rows] if output_tokens is None else np.full(n, output_tokens)
    specs = [RequestSpec(float(times[k]), int(tr.prompt_tokens[rows[k]]), int(outputs[k]),
                         tier_set[tier_idx[k]].name, Priority.LOW if low[k] else Priority.IMPORTANT,
                         block_ids=tr.block_ids[rows[k]] if tr.block_ids is not None else None)
             for k in range(n)]
    return Workload(tr.name, specs, tier_set, rule, tr.long_prompt_threshold, qps, tr.block_tokens)


def _arrival_times(tr: Trace, arrival: str, qps, num_requests, duration_s, diurnal_qps, period_s, rng):
    if arrival == "poisson":
        if qps is None or qps <= 0:
            raise ValueError("poisson arrivals need --qps > 0")
        n = num_requests or math.ceil((duration_s or DEFAULT_DURATION_S) * qps)
        return arrival_processes.poisson(n, qps, rng)
    if arrival == "trace":
        if tr.arrivals_s is None:
            raise ValueError(f"trace {tr.name} has no arrival times; use poisson arrivals")
        times = tr.arrivals_s
        if qps:
            times = times * ((len(times) / max(times[-1], 1e-9)) / qps)
        return times[:num_requests] if num_requests else times
    if arrival == "diurnal":
        if not diurnal_qps:
            raise ValueError("diurnal arrivals need (low, high) QPS")
        times = arrival_processes.diurnal(duration_s or DEFAULT_DURATION_S, diurnal_qps[0], diurnal_qps[1],
                                          period_s, rng)
        return times[:num_requests] if num_requests else times
    raise ValueError(f"unknown arrival process {arrival!r}; use poisson, trace or diurnal")


def clip_lengths(spec: RequestSpec, limit: int, max_prompt_tokens: int | None = None,
                 max_output_tokens: int | None = None) -> tuple[int, int]:
    """(prompt, output) lengths of `spec` cut so that they fit `limit` tokens together (the output keeps at
    most half) and the optional caps; real engines and servers cannot take what a trace row asks for."""
    out = min(spec.num_output_tokens, limit // 2, max_output_tokens or limit)
    prompt = min(spec.num_prompt_tokens, limit - out, max_prompt_tokens or limit)
    return prompt, out
