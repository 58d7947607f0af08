"""How many replicas a load needs: the smallest shared pool and the best silo split.

A fleet passes when its worst tier has <= `target_pct` violations (the
artifact's definition). The searches:

- Silos are independent: a tier's requests only ever meet their own pool.
  So the silo split with the fewest replicas is each tier's smallest
  passing pool, searched apart; any other split of the same total leaves
  some tier below its smallest pool and fails it. Nothing else needs trying.
- Round-robin ignores replica state, so replica j of a round-robin pool of n
  serves exactly requests j, j+n, j+2n, ... of the pool's arrivals, whatever
  the other replicas do: simulating that replica alone gives its results
  request for request. A round-robin pool is evaluated on `sample_replicas`
  of its replicas (spread over j; 0 = all), at the cost of those alone.
- Any other router couples the replicas, so its pool is simulated whole
  (`simulate_cluster`); the round-robin shared pool is searched too, for
  comparison, at the cost of its sampled replicas.
- Each search starts from the pool's load over one replica's throughput
  bound in the trace's mix at the pool's largest step (2552 tokens shared,
  the silo's fixed chunk; `niyama bound`) and steps by 1, 2, 4, ... until
  the threshold is bracketed, then bisects. With `bound_floor` (default) it
  never goes below the fewest replicas that keep each one's load within
  that bound: fewer are overloaded, their backlog grows for as long as the
  load lasts, and only a run too short to show it passes them (the
  planner's runs are short, for speed). Without it the answer is the
  paper's criterion on a run of this length alone.
The searches run side by side in worker processes (`niyama.sim.parallel`), the
whole-fleet one first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from ..metrics.throughput_bound import mixed_step, request_lengths
from ..metrics.records import is_violated
from ..predictor import DEFAULT_PROFILE, load_profile
from ..sim.parallel import run_parallel
from ..sim.run import DEFAULT_KV_TOKENS, simulate
from ..workload import Workload, make_workload
from ..workload.build import RequestSpec
from .fleet import SHARED_POLICY, SHARED_ROUTER, SILO_POLICY, make_fleet, silo_chunk, silo_spec
from .sim import ClusterResult, simulate_cluster

SHARED = "shared"


@dataclass
class PlanSetup:
    trace: str
    qps: float                                  # the whole fleet's load
    duration_s: float = 3600.0                  # arrivals span this long
    seed: int = 0
    profile: str = DEFAULT_PROFILE
    kv_tokens: int = DEFAULT_KV_TOKENS
    prefix_caching: bool = True
    noise: float = 0.0
    executor_profile: str | None = None         # how long batches really take (default: `profile`)
    workload_options: dict = field(default_factory=dict)   # make_workload keywords: tiers, tier_mix, ...
    target_pct: float = 1.0
    policy: str = SHARED_POLICY                 # the shared pool's
    router: str = SHARED_ROUTER                 # the shared pool's
    policy_options: dict = field(default_factory=dict)
    router_options: dict = field(default_factory=dict)
    silo_policy: str = SILO_POLICY
    sample_replicas: int = 2                    # round-robin pools: replicas simulated per evaluation (0: all)
    max_replicas: int = 512
    bound_floor: bool = True                    # never fewer replicas than keep each within its throughput bound

    def workload(self) -> Workload:
        return make_workload(self.trace, self.qps, duration_s=self.duration_s, seed=self.seed,
                             **self.workload_options)


@dataclass
class Evaluation:
    pool: str                                   # "shared" or a tier name (its silo)
    num_replicas: int
    router: str
    tier_violation_pct: dict[str, float]        # over the requests simulated
    passed: bool
    num_requests: int                           # simulated
    simulated_replicas: int
    backlog_s: float
    seconds: float

    @property
    def worst_pct(self) -> float:
        return max(self.tier_violation_pct.values(), default=0.0)


@dataclass
class Search:
    pool: str
    router: str
    answer: int | None                          # smallest passing count (None: none up to max_replicas)
    points: list[Evaluation]
    bound: float                                # the pool's load over one replica's throughput bound


@dataclass
class Plan:
    setup: PlanSetup
    tiers: list[str]
    shared: Search                              # with setup.router
    shared_rr: Search | None                    # round-robin, when setup.router is another
    silos: list[Search]                         # one per tier
    seconds: float

    @property
    def silo_counts(self) -> tuple[int, ...] | None:
        counts = tuple(s.answer for s in self.silos)
        return None if any(c is None for c in counts) else counts

    @property
    def silo_total(self) -> int | None:
        counts = self.silo_counts
        return None if counts is None else sum(counts)

    @property
    def saving(self) -> float | None:
        """1 - shared / silo replicas."""
        if self.shared.answer is None or not self.silo_total:
            return None
        return 1.0 - self.shared.answer / self.silo_total

    def to_dict(self) -> dict:
        out = {"setup": dataclasses.asdict(self.setup), "tiers": self.tiers,
               "shared": {"spec": f"shared:{self.shared.answer}" if self.shared.answer else None,
                          "replicas": self.shared.answer, "router": self.shared.router},
               "silo": {"spec": silo_spec(self.silo_counts) if self.silo_counts else None,
                        "replicas": self.silo_total, "counts": self.silo_counts},
               "saving": self.saving, "seconds": self.seconds,
               "searches": [{"pool": s.pool, "router": s.router, "answer": s.answer, "busy_replicas": s.bound,
                             "runs": len(s.points)} for s in self.searches],
               "evaluations": [dict(dataclasses.asdict(p), search=s.pool, worst_pct=p.worst_pct)
                               for s in self.searches for p in s.points]}
        if self.shared_rr is not None:
            out["shared_round_robin"] = {"replicas": self.shared_rr.answer}
        return out

    @property
    def searches(self) -> list[Search]:
        return [self.shared] + ([self.shared_rr] if self.shared_rr else []) + self.silos


# --- running a fleet, evaluating one pool -----------------------------------------

def run_fleet(setup: PlanSetup, spec: str, router: str | None = None, progress=None) -> ClusterResult:
    """The whole fleet `spec` (shared:N, silo:A,B,C) on setup's workload; `router`: the shared pool's (default
    setup.router)."""
    wl = setup.workload()
    fleet = make_fleet(spec, wl.tiers, policy=setup.policy, router=router or setup.router,
                       policy_options=setup.policy_options, silo_policy=setup.silo_policy)
    return simulate_cluster(wl, fleet, profile=setup.profile, kv_tokens=setup.kv_tokens, noise=setup.noise,
                            seed=setup.seed, executor_profile=setup.executor_profile,
                            router_options=setup.router_options, progress=progress,
                            prefix_caching=setup.prefix_caching)


def pool_workload(wl: Workload, tier: str | None) -> Workload:
    """The requests a pool gets: all of them (shared) or one tier's (its silo)."""
    if tier is None:
        return wl
    return dataclasses.replace(wl, specs=[s for s in wl.specs if s.tier == tier])


def silo_options(tier_name: str, wl: Workload) -> dict:
    return {"chunk_size": silo_chunk(wl.tier_by_name[tier_name])}


def evaluate_pool(setup: PlanSetup, wl: Workload, pool: str, n: int, router: str) -> Evaluation:
    """`n` replicas serving `pool`'s requests of `wl` ("shared": all, else one tier's, as its silo)."""
    t0 = time.time()
    tier = None if pool == SHARED else pool
    sub = pool_workload(wl, tier)
    policy = setup.policy if tier is None else setup.silo_policy
    opts = dict(setup.policy_options) if tier is None else silo_options(tier, wl)
    if router == "round-robin":
        # replica j serves arrivals j, j+n, ...: simulate a spread sample of them alone
        picks = range(n) if not setup.sample_replicas or setup.sample_replicas >= n else \
            sorted({(k * n) // setup.sample_replicas for k in range(setup.sample_replicas)})
        results = [simulate(_every(sub, j, n), policy, profile=setup.profile, kv_tokens=setup.kv_tokens,
                            noise=setup.noise, seed=setup.seed + j, policy_options=opts,
                            executor_profile=setup.executor_profile, prefix_caching=setup.prefix_caching)
                   for j in picks]
        requests = [r for res in results for r in res.requests]
        backlog = max(res.backlog_s for res in results)
        simulated = len(results)
    else:
        fleet = make_fleet(f"shared:{n}", wl.tiers, policy=policy, router=router, policy_options=opts)
        res = simulate_cluster(sub, fleet, profile=setup.profile, kv_tokens=setup.kv_tokens, noise=setup.noise,
                               seed=setup.seed, executor_profile=setup.executor_profile,
                               router_options=setup.router_options, prefix_caching=setup.prefix_caching)
        requests, backlog, simulated = res.requests, res.backlog_s, n
    per_tier = _violations(requests, [t.name for t in wl.tiers] if tier is None else [tier])
    passed = all(v <= setup.target_pct for v in per_tier.values())
    return Evaluation(pool, n, router, per_tier, passed, len(requests), simulated, backlog, time.time() - t0)


def _every(wl: Workload, j: int, n: int) -> Workload:
    specs: list[RequestSpec] = wl.specs[j::n]
    return dataclasses.replace(wl, specs=specs)


def _violations(requests, tiers: list[str]) -> dict[str, float]:
    """Violation % per tier, as `metrics.tier_violations` counts them (a rejected request is violated)."""
    counts = {t: [0, 0] for t in tiers}
    for r in requests:
        c = counts[r.tier.name]
        c[0] += 1
        c[1] += r.rejected or is_violated(r)
    return {t: (100.0 * v / n if n else 0.0) for t, (n, v) in counts.items()}


# --- searching ----------------------------------------------------------------

def smallest_passing(evaluate: Callable[[int], Evaluation], start: int, max_n: int, min_n: int = 1
                     ) -> tuple[int | None, list[Evaluation]]:
    """The smallest n in [min_n, max_n] with evaluate(n).passed, assuming more replicas never hurt: from `start`,
    steps of 1, 2, 4, ... down while it passes (up while it fails) until the threshold is bracketed, then
    bisect. None if even `max_n` fails."""
    seen: dict[int, Evaluation] = {}

    def passes(n: int) -> bool:
        if n not in seen:
            seen[n] = evaluate(n)
        return seen[n].passed

    n = max(min_n, min(start, max_n))
    step = 1
    if passes(n):
        lo, hi = min_n - 1, n                   # lo fails (taken to), hi passes
        while hi > min_n:
            probe = max(min_n, hi - step)
            if not passes(probe):
                lo = probe
                break
            hi, step = probe, step * 2
    else:
        lo, hi = n, None
        while hi is None:
            probe = min(lo + step, max_n)
            if passes(probe):
                hi = probe
            elif probe == max_n:
                return None, list(seen.values())
            else:
                lo, step = probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi, list(seen.values())


def load_over_bound(setup: PlanSetup, wl: Workload, pools: list[str]) -> dict[str, float]:
    """Per pool, its load over one replica's throughput bound at its largest step: the replicas it keeps busy."""
    lengths = request_lengths(setup.trace, seed=setup.seed, kv_tokens=setup.kv_tokens if setup.prefix_caching else None)
    profile = load_profile(setup.executor_profile or setup.profile)
    max_num_seqs = setup.policy_options.get("max_num_seqs", 256)
    out = {}
    for pool in pools:
        budget = 2552 if pool == SHARED else silo_options(pool, wl)["chunk_size"]
        load = len(pool_workload(wl, None if pool == SHARED else pool)) / max(wl.last_arrival_s, 1e-9)
        out[pool] = load / mixed_step(profile, lengths, budget, max_num_seqs).qps
    return out


def search_range(setup: PlanSetup, busy: float) -> tuple[int, int]:
    """(start, smallest count allowed) for a pool that keeps `busy` replicas busy."""
    floor = max(1, math.ceil(busy - 1e-9)) if setup.bound_floor else 1
    return max(floor, math.floor(busy)), floor


def plan_fleet(setup: PlanSetup, processes: int | None = None, show_progress: bool = True) -> Plan:
    """The smallest shared pool (with setup.router, and with round-robin) and the best silo split for setup's
    load. The searches run side by side; the whole-fleet one (setup.router) first, as it is the longest."""
    t0 = time.time()
    wl = setup.workload()
    tiers = [t.name for t in wl.tiers]
    used = {s.tier for s in wl.specs}
    silo_tiers = [t for t in tiers if t in used]
    busy = load_over_bound(setup, wl, [SHARED] + silo_tiers)
    items = ([(SHARED, setup.router)] if setup.router != "round-robin" else []) + \
        [(SHARED, "round-robin")] + [(t, "round-robin") for t in silo_tiers]

    def search(item, tick) -> Search:
        pool, router = item
        start, floor = search_range(setup, busy[pool])

        def ev(n: int) -> Evaluation:
            e = evaluate_pool(setup, wl, pool, n, router)
            tick(f"{pool} x{n} {router}: worst {e.worst_pct:.2f}%")
            return e
        answer, points = smallest_passing(ev, start, setup.max_replicas, floor)
        return Search(pool, router, answer, sorted(points, key=lambda p: p.num_replicas), busy[pool])

    found = run_parallel(search, items, processes=processes, desc="planning", ticks_per_item=3,
                         ticks_of=lambda s: len(s.points), unit="run", show_progress=show_progress)
    shared = found[0]
    shared_rr = found[1] if setup.router != "round-robin" else None
    by = {s.pool: s for s in found[len(items) - len(silo_tiers):]}
    silos = [by[t] if t in by else Search(t, "round-robin", 0, [], 0.0) for t in tiers]
    return Plan(setup, tiers, shared, shared_rr, silos, time.time() - t0)
