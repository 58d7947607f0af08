"""Capacity studies: goodput search per (trace, policy), several in parallel."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..metrics.capacity import Point, round_qps, search_capacity, search_sustainable, start_guess
from ..metrics.summary import tier_violations
from ..predictor import load_profile
from ..workload import load_trace, make_workload
from ..workload.build import DEFAULT_DURATION_S
from .run import DEFAULT_KV_TOKENS, simulate


@dataclass
class CapacityJob:
    trace: str
    policy: str
    profile: str = "a100-llama3-8b"
    duration_s: float = DEFAULT_DURATION_S    # arrivals span this long at every load...
    num_requests: int | None = None           # ...unless a fixed request count is given
    seed: int = 0
    tiers: str | None = None
    tier_mix: str | None = None
    low_priority_fraction: float = 0.0
    policy_options: dict = field(default_factory=dict)
    kv_tokens: int = DEFAULT_KV_TOKENS
    noise: float = 0.0
    target_pct: float = 1.0
    sustainable: bool = True

    @property
    def label(self) -> str:
        return f"{self.trace}/{self.policy}"


@dataclass
class CapacityResult:
    job: CapacityJob
    capacity_qps: float
    sustainable_qps: float | None
    points: list[Point]
    long_points: list[Point]
    seconds: float

    def to_dict(self) -> dict:
        return {"trace": self.job.trace, "policy": self.job.policy, "capacity_qps": self.capacity_qps,
                "sustainable_qps": self.sustainable_qps, "seconds": self.seconds, "job": asdict(self.job),
                "points": [asdict(p) for p in self.points], "long_points": [asdict(p) for p in self.long_points]}


def evaluate_load(job: CapacityJob, qps: float, scale: float = 1.0) -> Point:
    """One simulated run at `qps`; `scale` multiplies the run length."""
    n = int(job.num_requests * scale) if job.num_requests else None
    wl = make_workload(job.trace, qps, num_requests=n, duration_s=job.duration_s * scale, seed=job.seed,
                       tiers=job.tiers, tier_mix=job.tier_mix, low_priority_fraction=job.low_priority_fraction)
    res = simulate(wl, job.policy, profile=job.profile, kv_tokens=job.kv_tokens, noise=job.noise, seed=job.seed,
                   policy_options=job.policy_options)
    per_tier = tier_violations(res)
    worst = max(per_tier.values())
    ok = worst <= job.target_pct
    if scale > 1:   # sustainable: the backlog must also stay under the shortest TTLT
        ttlts = [t.ttlt_s for t in wl.tiers if not t.interactive]
        ok = ok and (not ttlts or res.backlog_s < min(ttlts))
    return Point(qps, worst, ok, res.backlog_s,
                 {"tiers": per_tier, "requests": len(wl), "relegated": res.num_relegations,
                  "preemptions": res.num_preemptions})


def initial_qps(job: CapacityJob) -> float:
    tr = load_trace(job.trace)
    pred = load_profile(job.profile)
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


# --- several jobs in parallel ---------------------------------------------

_progress_queue = None


def _init_worker(q):
    global _progress_queue
    _progress_queue = q


def _worker(job: CapacityJob) -> CapacityResult:
    return find_capacity(job, lambda label, p, long: _progress_queue.put((label, p.qps, p.violation_pct, long)))


def run_capacity_jobs(jobs: list[CapacityJob], processes: int | None = None, show_progress: bool = True
                      ) -> list[CapacityResult]:
    """Find every job's capacity, `processes` at a time (default: one per core), with a progress bar."""
    from tqdm import tqdm

    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    expected_runs = len(jobs) * (10 if jobs and jobs[0].sustainable else 7)
    bar = tqdm(total=expected_runs, unit="run", desc="capacity search", disable=not show_progress,
               dynamic_ncols=True)
    results: dict[int, CapacityResult] = {}

    def tick(label, qps, viol, long):
        if bar.n + 1 > bar.total:
            bar.total = bar.n + 1
        bar.update(1)
        bar.set_postfix_str(f"{label} {'2x ' if long else ''}{qps:g} QPS -> {viol:.1f}%")

    if processes == 1:
        for k, job in enumerate(jobs):
            results[k] = find_capacity(job, lambda label, p, long: tick(label, p.qps, p.violation_pct, long))
    else:
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        with ctx.Pool(processes, initializer=_init_worker, initargs=(q,)) as pool:
            pending = {k: pool.apply_async(_worker, (job,)) for k, job in enumerate(jobs)}
            while pending:
                try:
                    tick(*q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                for k in [k for k, r in pending.items() if r.ready()]:
                    results[k] = pending.pop(k).get()   # re-raises a worker's exception here
            while not q.empty():
                tick(*q.get())
    bar.total = bar.n
    bar.close()
    return [results[k] for k in range(len(jobs))]
