"""Online correction: a profile's predictions, rescaled by what the engine measures.

A profile fitted on another machine, another engine build or another model
size is wrong by a factor (the H100 server planned with the A100 profile and
its steps took 1.5-2x the prediction), and a wrong prediction costs
deadlines every iteration: dynamic chunking picks the largest chunk whose
*predicted* time fits the decodes' slack. So the engine keeps, per kind of
step, the running ratio of measured to predicted time (an exponential average
of its logarithm, bounded) and multiplies the profile's predictions by it.
A right profile keeps ratios of 1 and changes nothing; a wrong one is
corrected within a few dozen steps of each kind, i.e. a second or two.

Kinds of step: decode-only, with prefill up to `split` tokens, with more
(the two regimes of the paper's linear fit, and decode-only steps apart,
which carry no prefill cost and so err differently).
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("niyama.predictor")

KINDS = ("decode-only", "small", "large")
LOG_INTERVAL_S = 60.0     # a kind's move is logged at most once a minute (the ratios are a metric too)


class OnlineCorrection:
    def __init__(self, base, weight: float = 0.05, bound: float = 4.0, split: int = 512, clock=time.monotonic):
        """`weight`: how much each measured step moves its kind's ratio (0.05: ~20 steps of memory);
        `bound`: ratios stay within [1/bound, bound]; `split`: total tokens between small and large steps;
        `clock`: seconds, for spacing the log lines."""
        if not 0 < weight <= 1 or not bound > 1:
            raise ValueError("the correction's weight must be in (0, 1] and its bound > 1")
        self.base = base
        self.weight = weight
        self.log_bound = math.log(bound)
        self.split = split
        self._log_ratio = [0.0, 0.0, 0.0]
        self._logged = [1.0, 1.0, 1.0]         # the ratio last written to the log, per kind
        self._logged_at = [-math.inf] * 3      # when, by `clock`
        self._clock = clock

    @property
    def name(self) -> str:
        return f"{self.base.name}+online"

    @property
    def ratios(self) -> dict[str, float]:
        """Measured / predicted-by-the-profile, per kind of step (1 = the profile is right)."""
        return {kind: math.exp(r) for kind, r in zip(KINDS, self._log_ratio)}

    def _kind(self, num_prefill_tokens: int, num_decode_tokens: int) -> int:
        if num_prefill_tokens == 0:
            return 0
        return 1 if num_prefill_tokens + num_decode_tokens <= self.split else 2

    def batch_time(self, num_prefill_tokens: int, num_decode_tokens: int,
                   decode_context: int, prefill_context: int, num_sampled: int = 0) -> float:
        base = self.base.batch_time(num_prefill_tokens, num_decode_tokens, decode_context, prefill_context,
                                    num_sampled)
        return base * math.exp(self._log_ratio[self._kind(num_prefill_tokens, num_decode_tokens)])

    def observe(self, num_prefill_tokens: int, num_decode_tokens: int, decode_context: int,
                prefill_context: int, measured_s: float, num_sampled: int = 0) -> None:
        """A step of this shape took `measured_s`."""
        predicted = self.base.batch_time(num_prefill_tokens, num_decode_tokens, decode_context, prefill_context,
                                         num_sampled)
        if not (predicted > 0 and measured_s > 0):
            return
        k = self._kind(num_prefill_tokens, num_decode_tokens)
        target = min(self.log_bound, max(-self.log_bound, math.log(measured_s / predicted)))
        self._log_ratio[k] += self.weight * (target - self._log_ratio[k])
        ratio = math.exp(self._log_ratio[k])
        if abs(ratio / self._logged[k] - 1) > 0.1:     # say so when it moves by 10%, at most once a minute
            now = self._clock()
            if now - self._logged_at[k] < LOG_INTERVAL_S:
                return
            self._logged[k], self._logged_at[k] = ratio, now
            log.info("batch-time correction: %s steps take %.2fx what profile %s predicts", KINDS[k], ratio,
                     self.base.name)

    def observe_plan(self, plan, measured_s: float) -> None:
        """A measured `BatchPlan` (run after the replica's step)."""
        self.observe(plan.num_prefill_tokens, plan.num_decodes, plan.decode_context, plan.prefill_context,
                     measured_s, plan.num_sampled)
