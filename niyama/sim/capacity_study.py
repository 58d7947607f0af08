"""Capacity studies: goodput search per (trace, policy), several in parallel."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..metrics.goodput_search import Point, round_qps, search_capacity, search_sustainable, start_guess
from ..metrics.summary import tier_violations
from ..predictor import load_profile
from ..workload import load_trace
from .parallel import run_parallel
from .scenario import Scenario


@dataclass
class CapacityJob:
    scenario: Scenario
    target_pct: float = 1.0        # violation % allowed in the worst tier
    sustainable: bool = True       # also search the sustainable capacity (2x runs, bounded backlog)

    @property
    def label(self) -> str:
        return self.scenario.label


@dataclass
class CapacityResult:
    job: CapacityJob
    capacity_qps: float
    sustainable_qps: float | None
    points: list[Point]
    long_points: list[Point]
    seconds: float

    def to_dict(self) -> dict:
        sc = self.job.scenario
        return {"trace": sc.trace, "policy": sc.policy, "capacity_qps": self.capacity_qps,
                "sustainable_qps": self.sustainable_qps, "seconds": self.seconds, "job": asdict(self.job),
                "points": [asdict(p) for p in self.points], "long_points": [asdict(p) for p in self.long_points]}


def evaluate_load(job: CapacityJob, qps: float, scale: float = 1.0) -> Point:
    """One simulated run at `qps`; `scale` multiplies the run length."""
    res = job.scenario.simulate(qps, scale)
    per_tier = tier_violations(res)
    worst = max(per_tier.values())
    ok = worst <= job.target_pct
    if scale > 1:   # sustainable: the backlog must also stay under the shortest TTLT
        ttlts = [t.ttlt_s for t in res.workload.tiers if not t.interactive]
        ok = ok and (not ttlts or res.backlog_s < min(ttlts))
    longest = max(t.ttlt_s if not t.interactive else t.ttft_s for t in res.workload.tiers)
    return Point(qps, worst, ok, res.backlog_s,
                 {"tiers": per_tier, "requests": len(res.requests), "relegated": res.num_relegations,
                  "preemptions": res.num_preemptions, "span_s": max(r.arrival_s for r in res.requests),
                  "prefix_hit_pct": round(res.prefix_hit_pct, 2),
                  "longest_deadline_s": longest})


def initial_qps(job: CapacityJob) -> float:
    tr = load_trace(job.scenario.trace)
    pred = load_profile(job.scenario.profile)
    per_token = pred.batch_time(2552, 0, 0, 0) / 2552
    return round_qps(start_guess(float(np.mean(tr.prompt_tokens)), float(np.mean(tr.output_tokens)), per_token))


def find_capacity(job: CapacityJob, report=None) -> CapacityResult:
    """`report(label, point, long)` is called after every simulated run."""
    t0 = time.time()

    def ev(q: float, scale: float = 1.0) -> Point:
        p = evaluate_load(job, round_qps(q), scale)
        if report is not None:
            report(job.label, p, scale > 1)
        return p

    found = search_capacity(ev, initial_qps(job), target_pct=job.target_pct)
    sustainable, long_points = None, []
    if job.sustainable:
        s = search_sustainable(lambda q: ev(q, 2.0), found.qps)
        sustainable, long_points = s.qps, s.points
    return CapacityResult(job, found.qps, sustainable, found.points, long_points, time.time() - t0)


def run_capacity_jobs(jobs: list[CapacityJob], processes: int | None = None, show_progress: bool = True
                      ) -> list[CapacityResult]:
    """Find every job's capacity, `processes` at a time (default: one per core), with a progress bar
    that advances once per simulated run."""
    def one(job: CapacityJob, tick) -> CapacityResult:
        return find_capacity(job, lambda label, p, long: tick(
            f"{label} {'2x ' if long else ''}{p.qps:g} QPS -> {p.violation_pct:.1f}%"))

    # a search takes ~7 runs (+3 for the sustainable one); the bar counts 16 and corrects as each search ends
    return run_parallel(one, jobs, processes=processes, desc="capacity search", ticks_per_item=16,
                        ticks_of=lambda r: len(r.points) + len(r.long_points), show_progress=show_progress)
