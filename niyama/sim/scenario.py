"""A scenario: everything about a simulated run except the load.

Capacity searches and experiments vary the load (or one knob) over a fixed
scenario, so the scenario is the unit they pass around, pickle into worker
processes, and print in their results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..predictor import DEFAULT_PROFILE
from ..workload import Workload, make_workload
from ..workload.build import DEFAULT_DURATION_S
from .run import DEFAULT_KV_TOKENS, SimResult, simulate


@dataclass
class Scenario:
    trace: str
    policy: str
    profile: str = DEFAULT_PROFILE
    kv_tokens: int = DEFAULT_KV_TOKENS
    noise: float = 0.0
    seed: int = 0
    duration_s: float = DEFAULT_DURATION_S    # arrivals span this long at every load...
    num_requests: int | None = None           # ...unless a fixed request count is given
    workload_options: dict = field(default_factory=dict)   # more make_workload keywords (tiers, tier_mix, ...)
    policy_options: dict = field(default_factory=dict)     # policy knobs (see `niyama policies`)
    executor_profile: str | None = None       # how long batches really take (default: `profile`)
    online_correction: bool = False           # the scheduler rescales its profile by the times it sees
    prefix_caching: bool = True               # cached prompt blocks are shared (workloads with block ids)
    kv_options: dict = field(default_factory=dict)         # more BlockAllocator keywords (eviction)

    @property
    def label(self) -> str:
        return f"{self.trace}/{self.policy}"

    def replace(self, **changes) -> "Scenario":
        return dataclasses.replace(self, **changes)

    def workload(self, qps: float | None, scale: float = 1.0) -> Workload:
        """The workload at `qps`; `scale` multiplies the run length."""
        n = int(self.num_requests * scale) if self.num_requests else None
        return make_workload(self.trace, qps, num_requests=n, duration_s=self.duration_s * scale, seed=self.seed,
                             **self.workload_options)

    def simulate(self, qps: float | None, scale: float = 1.0, on_step=None) -> SimResult:
        return simulate(self.workload(qps, scale), self.policy, profile=self.profile, kv_tokens=self.kv_tokens,
                        noise=self.noise, seed=self.seed, policy_options=self.policy_options, on_step=on_step,
                        executor_profile=self.executor_profile, online_correction=self.online_correction,
                        prefix_caching=self.prefix_caching, kv_options=self.kv_options)
