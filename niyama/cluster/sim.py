"""Many replicas behind routers, in one simulated clock.

Each replica is the single-replica simulator's: a `Replica` loop with its
own policy (`make_scheduler`), `SimulatedExecutor`, KV cache and
`VirtualClock`. The clocks are kept together by one loop over requests in
arrival order:

    for each request, at its arrival time t:
        step every replica whose next step starts before t (a heap of
            replicas with work, by the time their next step starts)
        its pool's router picks a replica, seeing every replica as those
            steps left it
        the replica takes the request at t (an idle replica's clock jumps
            to t) and its scheduler queues it at once
    then every replica runs until its work is done.

A replica whose last step started before t and ends after it is mid-step
at t; the router sees it as that step will leave it (its prefill chunks
done, its queue without them), not as of the step's start: a look-ahead of
at most one step (a 2552-token step takes 0.25 s on the A100 profile,
against a 6 s TTFT). The request cannot join that step either way: the
replica's next step starts at the step's end and is the first to see it.
Queuing the request at routing time instead of at the next step's start
changes nothing for the scheduler (that step sees the same queue) but lets
the router count it. With one replica, a request is queued before the first
step that starts at or after its arrival, as in `niyama.sim.simulate`, so the
results are the same request for request (tests/cluster/test_cluster.py).

A held request (a router's None) is routed again `retry_s` later, its
arrival time unchanged. Results: every request, finished, with its token
segments moved onto one concatenation of the replicas' iteration end times,
so `niyama.metrics.summarize` and the records work on a fleet as on a
replica; plus which replica served each request and per-replica counts.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..kv import BlockAllocator
from ..messages import LoadReport, Route
from ..predictor import DEFAULT_PROFILE, load_profile
from ..replica import Recorder, Replica
from ..request import Request
from ..routing import Router, View, make_router
from ..scheduler import make_scheduler
from ..sim.executor import SimulatedExecutor
from ..sim.run import DEFAULT_KV_TOKENS, SimResult
from ..workload import Workload
from .fleet import Fleet, Pool


@dataclass
class Node:
    """One replica of the fleet and what the cluster keeps about it."""
    index: int                         # in the fleet
    pool: Pool
    replica: Replica
    queued_prefill_tokens: int = 0     # routed here, not yet prefilled (recompute after preemption included)
    output_tokens_left: int = 0        # routed here, not made yet (to each request's max_output_tokens)
    busy_s: float = 0.0                # sum of its step times
    in_heap: bool = False              # in the loop's heap of replicas with work

    def on_step(self, plan, result, end: float) -> None:
        self.queued_prefill_tokens -= plan.num_prefill_tokens
        for c in plan.prefills:        # a prefill's first chunk: the cached prefix it skipped is done too
            if c.start == c.request.num_cached_tokens:
                self.queued_prefill_tokens -= c.start
        for req in plan.preempted:     # its KV is gone: prompt and tokens so far are prefilled again
            self.queued_prefill_tokens += req.num_prefill_target
        # every decode made a token, and so did every prefill that ended
        self.output_tokens_left -= plan.num_decodes + sum(c.completes_prefill for c in plan.prefills)
        for req in result.finished:    # ended by its executor (early): the rest will not come
            self.output_tokens_left -= req.max_output_tokens - req.num_output_tokens
        self.busy_s += result.duration_s


class NodeLoad:
    """`node`'s load report at `now` as its engine would make it (`messages.LoadReport`'s fields), for routing
    `req`. A field is computed when a rule first reads it: qos predicts only on the replicas it tries, mostly one.
    `ahead_s` holds `req`'s tier only: the scheduler's exact prediction of `req`'s own first token less its own
    prefill, which the rules add back. A replica mid-step is seen as the step will leave it (the module
    docstring): its predictions start at the step's end."""

    def __init__(self, node: Node, now: float, req: Request):
        self.replica, self.req, self.time = node.replica, req, now
        self.work_tokens = node.queued_prefill_tokens + node.output_tokens_left
        self._at = max(now, self.replica.clock.now())

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.replica.scheduler.admission_rate.tokens_per_s

    @cached_property
    def cached_tokens(self) -> int:
        """How much of `req`'s prompt this replica's prefix cache holds now."""
        return self.replica.kv.cached_tokens(self.req)

    @cached_property
    def ahead_s(self) -> dict:
        req = self.req
        req.num_cached_tokens = self.cached_tokens      # its place in this replica's order depends on it
        first = self.replica.scheduler.predicted_first_token_s(self._at, req)
        return {req.tier.name: first - self.time - req.num_remaining_prefill / self.prefill_tokens_per_s}

    @property
    def requests(self) -> int:
        return self.replica.num_unfinished

    @property
    def kv_free_tokens(self) -> int:
        kv = self.replica.kv
        return max(0, kv.num_free - kv.num_watermark_blocks) * kv.block_size

    @cached_property
    def decodes_late(self) -> bool:
        decodes = self.replica.decodes
        return bool(decodes) and decodes.min_deadline(self.replica.iteration) < self._at

    def report(self) -> LoadReport:
        return LoadReport(*(getattr(self, f) for f in LoadReport._fields))


@dataclass
class ReplicaStats:
    index: int
    pool: str
    policy: str
    num_requests: int
    tier_requests: dict[str, int]
    num_iterations: int
    num_preemptions: int
    num_relegations: int
    busy_s: float


@dataclass
class ClusterResult(SimResult):
    fleet: Fleet | None = None
    replica_of: np.ndarray | None = None          # per request (in `requests` order): the fleet index serving it
    replicas: list[ReplicaStats] = field(default_factory=list)
    num_held: int = 0                             # times a router held a request

    @property
    def utilization(self) -> float:
        """Mean over replicas of busy time / makespan."""
        span = max(r.finish_s for r in self.requests)
        return float(np.mean([s.busy_s for s in self.replicas])) / span if span > 0 else 0.0


def simulate_cluster(workload: Workload, fleet: Fleet, *, profile: str = DEFAULT_PROFILE,
                     kv_tokens: int = DEFAULT_KV_TOKENS, noise: float = 0.0, seed: int = 0,
                     executor_profile: str | None = None, router_options: dict | None = None,
                     progress=None, prefix_caching: bool = True, kv_options: dict | None = None) -> ClusterResult:
    """Run `workload` through `fleet`. `router_options` go to every pool's router that is not round-robin
    (e.g. the qos router's tie_s, hold_s). Replica k's noise stream is seeded with `seed + k`.
    `progress(n)`: called with the number of requests routed, then finished, now and then."""
    planned = load_profile(profile)
    truth = planned if executor_profile is None else load_profile(executor_profile)
    nodes: list[Node] = []
    pools: list[tuple[list[Node], Router]] = []
    for pool in fleet.pools:
        members = []
        for _ in range(pool.num_replicas):
            k = len(nodes)
            kv = BlockAllocator.for_tokens(kv_tokens, prefix_caching=prefix_caching, **(kv_options or {}))
            replica = Replica(make_scheduler(pool.policy, planned, **pool.policy_options),
                              SimulatedExecutor(truth, noise, seed + k), kv, recorder=Recorder())
            node = Node(k, pool, replica)
            replica.on_step.append(node.on_step)
            nodes.append(node)
            members.append(node)
        opts = router_options if router_options and pool.router != "round-robin" else {}
        pools.append((members, make_router(pool.router, **opts)))
    pool_of = _pool_of_tier(fleet, workload)

    requests = workload.requests(nodes[0].replica.kv.block_size)
    assert all(r.request_id == i for i, r in enumerate(requests)), "workload request ids are their positions"
    replica_of = np.full(len(requests), -1, dtype=np.int64)
    busy: list[tuple[float, int]] = []             # (next step start, node index)
    events = [(r.arrival_s, r.request_id, r) for r in requests]
    heapq.heapify(events)
    seq, num_held, num_routed = len(requests), 0, 0

    def advance(t: float) -> None:
        while busy and busy[0][0] < t:
            _, k = heapq.heappop(busy)
            replica = nodes[k].replica
            replica.step()
            if replica.has_work:
                heapq.heappush(busy, (replica.clock.now(), k))
            else:
                nodes[k].in_heap = False

    while events:
        t, _, req = heapq.heappop(events)
        advance(t)
        members, router = pools[pool_of[req.tier.name]]
        choice = route(router, t, req, members)
        if choice is None:
            seq += 1
            num_held += 1
            heapq.heappush(events, (t + router.retry_s, seq, req))
            continue
        node = members[choice]
        _dispatch(node, t, req, busy)
        replica_of[req.request_id] = node.index
        num_routed += 1
        if progress is not None and num_routed % 4096 == 0:
            progress(num_routed)
    for node in nodes:
        node.replica.run()
    if progress is not None:
        progress(len(requests))
    return _result(workload, fleet, nodes, requests, replica_of, num_held)


def route(router: Router, now: float, req: Request, members: list[Node]) -> int | None:
    """Index in `members` of the replica that gets `req`, or None to hold it: `router`'s rule over the views
    the replicas' own load reports would give now (every earlier send already counted in)."""
    return router.choose([View(NodeLoad(m, now, req)) for m in members], route_of(req, now))


def route_of(req: Request, now: float) -> Route:
    return Route(req.tier.name, req.tier.interactive, req.num_prompt_tokens, req.max_output_tokens,
                 req.first_token_deadline_s - req.arrival_s, now, now - req.arrival_s)


def _pool_of_tier(fleet: Fleet, workload: Workload) -> dict[str, int]:
    used = {s.tier for s in workload.specs}
    out = {}
    for tier in workload.tiers:
        k = next((i for i, p in enumerate(fleet.pools) if p.serves(tier.name) and p.num_replicas), None)
        if k is None and tier.name in used:
            raise ValueError(f"fleet {fleet.spec}: no replica serves tier {tier.name}")
        out[tier.name] = k
    return out


def _dispatch(node: Node, t: float, req: Request, busy: list) -> None:
    """`node`'s replica takes `req` at `t` and queues it at once (see the module docstring)."""
    replica = node.replica
    replica.clock.wait_until(t)
    replica.add(req)
    replica.admit_arrivals()
    if not req.rejected:
        node.queued_prefill_tokens += req.num_prompt_tokens
        node.output_tokens_left += req.max_output_tokens
    if not node.in_heap and replica.has_work:
        heapq.heappush(busy, (replica.clock.now(), node.index))
        node.in_heap = True


def _result(workload: Workload, fleet: Fleet, nodes: list[Node], requests: list[Request], replica_of: np.ndarray,
            num_held: int) -> ClusterResult:
    """Check every replica's blocks, move token segments onto one timeline of iteration end times."""
    offsets, ends = [], []
    for node in nodes:
        offsets.append(len(ends))
        ends.extend(node.replica.recorder.iteration_end_s)
    by_node: list[list[Request]] = [[] for _ in nodes]
    for req, k in zip(requests, replica_of):
        by_node[k].append(req)
    stats = []
    for node, served in zip(nodes, by_node):
        rep = node.replica
        rep.kv.check(r for r in served if r.block_ids)
        assert rep.kv.num_free == rep.kv.num_blocks, f"replica {node.index}: blocks leaked"
        record = rep.recorder
        assert rep.num_unfinished == 0 and len(record.finished) == len(served), f"replica {node.index}: unfinished"
        off = offsets[node.index]
        if off:
            for req in served:
                for seg in req.token_segments:
                    seg[0] += off
                    seg[1] += off
        tiers: dict[str, int] = {}
        for req in served:
            tiers[req.tier.name] = tiers.get(req.tier.name, 0) + 1
        stats.append(ReplicaStats(node.index, node.pool.name, node.pool.policy, len(served), tiers, rep.iteration,
                                  record.num_preemptions, record.num_relegations, node.busy_s))
    return ClusterResult(workload, fleet.label, requests, ends, sum(s.num_iterations for s in stats),
                         sum(s.num_preemptions for s in stats), sum(s.num_relegations for s in stats),
                         sum(n.replica.kv.num_query_tokens for n in nodes), sum(n.replica.kv.num_hit_tokens for n in nodes),
                         fleet=fleet, replica_of=replica_of, replicas=stats, num_held=num_held)
