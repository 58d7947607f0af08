"""Run one workload through one policy on one simulated replica."""

from __future__ import annotations

from dataclasses import dataclass

from ..kv import BlockAllocator
from ..predictor import DEFAULT_PROFILE, load_profile
from ..predictor.online import OnlineCorrection
from ..replica import Recorder, Replica
from ..request import Request
from ..scheduler import make_scheduler
from ..workload import Workload
from .executor import SimulatedExecutor

DEFAULT_KV_TOKENS = 440_000   # Llama-3-8B bf16 on an 80 GB GPU at 0.9 utilisation


@dataclass
class SimResult:
    workload: Workload
    policy: str
    requests: list[Request]          # every request, finished
    iteration_end_s: list[float]     # token times come from here
    num_iterations: int
    num_preemptions: int
    num_relegations: int
    prefix_query_tokens: int = 0     # prefill tokens looked up in the prefix cache (every start, re-prefills too)
    prefix_hit_tokens: int = 0       # of which cached

    @property
    def prefix_hit_pct(self) -> float:
        return 100.0 * self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def backlog_s(self) -> float:
        """Time from the last arrival to the last completion."""
        return max(r.finish_s for r in self.requests) - self.workload.last_arrival_s


def simulate(workload: Workload, policy: str = "niyama", *, profile: str = DEFAULT_PROFILE,
             kv_tokens: int = DEFAULT_KV_TOKENS, noise: float = 0.0, seed: int = 0,
             policy_options: dict | None = None, on_step=None, progress=None,
             executor_profile: str | None = None, online_correction: bool = False,
             prefix_caching: bool = True, kv_options: dict | None = None) -> SimResult:
    """`profile`: what the scheduler plans with; `executor_profile`: how long batches really take (default:
    the same; another one simulates a scheduler planning with a wrong profile); `online_correction`: the
    scheduler's profile is rescaled by the step times it sees, as the engine does. `prefix_caching`: requests
    whose workload spec carries prefix block ids share their cached blocks (kv.py); `kv_options`: more
    BlockAllocator keywords (eviction)."""
    profile_model = load_profile(profile)
    truth = profile_model if executor_profile is None else load_profile(executor_profile)
    predictor = OnlineCorrection(profile_model) if online_correction else profile_model
    scheduler = make_scheduler(policy, predictor, **(policy_options or {}))
    kv = BlockAllocator.for_tokens(kv_tokens, prefix_caching=prefix_caching, **(kv_options or {}))
    record = Recorder()
    replica = Replica(scheduler, SimulatedExecutor(truth, noise, seed), kv, recorder=record)
    if online_correction:
        replica.on_step.append(lambda plan, result, end: predictor.observe_plan(plan, result.duration_s))
    if on_step is not None:
        replica.on_step.append(on_step)
    requests = workload.requests(kv.block_size)
    for req in requests:
        replica.add(req)
    replica.run(progress)
    kv.check(r for r in requests if r.block_ids)
    assert kv.num_free == kv.num_blocks, "blocks leaked"
    return SimResult(workload, policy, requests, record.iteration_end_s, replica.iteration,
                     record.num_preemptions, record.num_relegations, kv.num_query_tokens, kv.num_hit_tokens)

