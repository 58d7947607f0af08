"""The simulated executor: a batch takes as long as the profile predicts,
optionally times seeded multiplicative (log-normal) noise."""

from __future__ import annotations

import random

from ..predictor import BatchTimePredictor
from ..replica import StepResult
from ..running import RunningDecodes
from ..scheduler import BatchPlan


class SimulatedExecutor:
    ends_requests = False      # a request ends when it made its trace's output length (replica.py)

    def __init__(self, predictor: BatchTimePredictor, noise: float = 0.0, seed: int = 0):
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.predictor = predictor
        self.noise = noise
        self._rng = random.Random(seed)

    def execute(self, plan: BatchPlan, decodes: RunningDecodes) -> StepResult:
        t = self.predictor.batch_time(plan.num_prefill_tokens, plan.num_decodes,
                                      plan.decode_context, plan.prefill_context, plan.num_sampled)
        if self.noise:
            t *= self._rng.lognormvariate(-0.5 * self.noise ** 2, self.noise)   # mean 1
        return StepResult(t)

    def release(self, req) -> None:
        """Nothing is kept per request."""
