"""Per-tier latency percentiles and violations of one run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .records import is_violated, request_records

PERCENTILES = (50, 95, 99)


@dataclass
class TierSummary:
    name: str
    target: str
    count: int
    ttft_s: tuple[float, ...]       # p50, p95, p99
    tbt_s: tuple[float, ...]
    ttlt_s: tuple[float, ...]
    violation_pct: float            # artifact definition, over the admitted requests
    strict_violation_pct: float     # + more than 1% of tokens late (interactive)
    relegated: int
    tbt_target_s: float | None = None   # interactive tiers' token pace
    rejected: int = 0               # refused at arrival (tiers with on_infeasible = reject)


@dataclass
class RunSummary:
    name: str
    policy: str
    qps: float | None
    num_requests: int
    tiers: list[TierSummary]
    violation_pct: float
    strict_violation_pct: float
    short_violation_pct: float
    long_violation_pct: float
    relegated: int
    preemptions: int
    backlog_s: float
    makespan_s: float
    num_iterations: int
    extra: dict = field(default_factory=dict)
    rejected: int = 0
    prefix_hit_pct: float = 0.0      # prefill tokens found in the prefix cache, % of those looked up

    @property
    def worst_tier_violation_pct(self) -> float:
        return max(t.violation_pct for t in self.tiers)

    @property
    def rejected_pct(self) -> float:
        return 100.0 * self.rejected / self.num_requests if self.num_requests else 0.0

    @property
    def num_on_time(self) -> int:
        """Admitted requests that met their tier's target (artifact definition)."""
        admitted = self.num_requests - self.rejected
        return admitted - round(admitted * self.violation_pct / 100)


def _pct(values) -> tuple[float, ...]:
    if len(values) == 0:
        return tuple(float("nan") for _ in PERCENTILES)
    return tuple(float(v) for v in np.percentile(values, PERCENTILES))


def _share(mask) -> float:
    return 100.0 * float(np.mean(mask)) if len(mask) else 0.0


def tier_violations(result) -> dict[str, float]:
    """Violation % per tier (artifact definition) — the cheap path for goodput search. Here a request
    rejected at arrival counts as violated: capacity is the load a replica serves, not the load it refuses."""
    counts: dict[str, list[int]] = {t.name: [0, 0] for t in result.workload.tiers}
    for r in result.requests:
        c = counts[r.tier.name]
        c[0] += 1
        c[1] += r.rejected or is_violated(r)
    return {name: (100.0 * v / n if n else 0.0) for name, (n, v) in counts.items()}


def summarize(result) -> tuple[RunSummary, dict[str, np.ndarray]]:
    """The run's summary and its per-request records."""
    wl = result.workload
    gaps: dict[str, list] = {}
    rec = request_records(result.requests, result.iteration_end_s, wl.long_prompt_threshold, True, gaps)
    tiers = []
    served = ~rec["rejected"]            # latencies and violations are over the admitted requests
    for tier in wl.tiers:
        m = rec["tier"] == tier.name
        a = m & served
        tier_gaps = np.concatenate(gaps[tier.name]) if gaps.get(tier.name) else np.zeros(0)
        tiers.append(TierSummary(
            tier.name, tier.describe(), int(m.sum()), _pct(rec["ttft_s"][a]), _pct(tier_gaps), _pct(rec["ttlt_s"][a]),
            _share(rec["violated"][a]), _share(rec["violated_strict"][a]), int(rec["relegated"][m].sum()),
            tier.tbt_s if tier.interactive else None, int((m & ~served).sum())))
    long = rec["long_prompt"]
    summary = RunSummary(
        wl.name, result.policy, wl.qps, len(result.requests), tiers,
        _share(rec["violated"][served]), _share(rec["violated_strict"][served]),
        _share(rec["violated"][served & ~long]), _share(rec["violated"][served & long]),
        int(rec["relegated"].sum()), result.num_preemptions, result.backlog_s,
        max(r.finish_s for r in result.requests), result.num_iterations, rejected=int((~served).sum()),
        prefix_hit_pct=getattr(result, "prefix_hit_pct", 0.0))
    return summary, rec


def goodput_text(s: RunSummary) -> str:
    """Requests that met their tier's target per second of the run, beside raw throughput."""
    ok = s.num_on_time
    span = max(s.makespan_s, 1e-9)
    return (f"goodput {ok / span:.3f} req/s ({ok} of {s.num_requests} on time over {span:.0f} s); "
            f"throughput {s.num_requests / span:.3f} req/s")


def format_report(s: RunSummary) -> str:
    qps = f" at {s.qps:g} QPS" if s.qps else ""
    iterations = f"{s.num_iterations} iterations, " if s.num_iterations else ""   # none seen by an HTTP client
    rej = s.rejected > 0                 # the column appears when admission control refused something
    lines = [f"{s.name} x {s.policy}{qps}: {s.num_requests} requests, {iterations}"
             f"makespan {s.makespan_s:.0f} s, backlog {s.backlog_s:.0f} s",
             "",
             f"{'tier':<5} {'n':>6}  {'TTFT p50/p95/p99 (s)':>22}  {'TBT p50/p95/p99 (ms)':>22}  "
             f"{'TTLT p50/p95/p99 (s)':>24}  {'viol%':>6} {'strict%':>7} {'releg':>6}" + (f" {'rej':>6}" if rej else "")]
    for t in s.tiers:
        ttft = "/".join(f"{v:.2f}" for v in t.ttft_s)
        tbt = "/".join(f"{v * 1000:.0f}" for v in t.tbt_s)
        ttlt = "/".join(f"{v:.1f}" for v in t.ttlt_s)
        lines.append(f"{t.name:<5} {t.count:>6}  {ttft:>22}  {tbt:>22}  {ttlt:>24}  {t.violation_pct:>6.2f} "
                     f"{t.strict_violation_pct:>7.2f} {t.relegated:>6}" + (f" {t.rejected:>6}" if rej else ""))
    lines += ["",
              f"violations: overall {s.violation_pct:.2f}% (strict {s.strict_violation_pct:.2f}%), "
              f"short {s.short_violation_pct:.2f}%, long {s.long_violation_pct:.2f}%; worst tier "
              f"{s.worst_tier_violation_pct:.2f}%" + (" (of the admitted requests)" if rej else ""),
              f"relegated {s.relegated}, KV preemptions {s.preemptions}"
              + (f", rejected at arrival {s.rejected} ({s.rejected_pct:.2f}%)" if rej else "")
              + (f"; prefix cache hits {s.prefix_hit_pct:.1f}% of prefill tokens" if s.prefix_hit_pct else ""),
              goodput_text(s),
              "tiers: " + "; ".join(t.target for t in s.tiers)]
    fast_gaps = [t for t in s.tiers if t.tbt_target_s and t.count and t.tbt_s[1] > t.tbt_target_s]
    if fast_gaps:
        names = ", ".join(f"{t.name} TBT p95 {t.tbt_s[1] * 1000:.0f} ms > {t.tbt_target_s * 1000:.0f} ms"
                          for t in fast_gaps)
        lines.append(f"note: {names}, yet tokens can be on time: token n is due at max(first token, arrival + "
                     "TTFT) + (n-1) x TBT, so a first token that came early banks slack that later gaps may "
                     "spend; strict% counts the requests with more than 1% of their tokens past due")
    return "\n".join(lines)

