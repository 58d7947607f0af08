"""BatchPlan: what one iteration runs. The scheduler's only output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..request import Request


@dataclass(slots=True)
class PrefillChunk:
    request: Request
    start: int          # first prefill position computed by this chunk (= context already in KV)
    num_tokens: int     # positions [start, start + num_tokens)

    @property
    def completes_prefill(self) -> bool:
        return self.start + self.num_tokens == self.request.num_prefill_target


@dataclass(slots=True)
class BatchPlan:
    iteration: int                 # index of the iteration this plan is for
    num_decodes: int               # every running decode runs one token; the replica holds them
    decode_context: int            # sum of decode context lengths (predictor feature)
    prefills: list[PrefillChunk]   # prefill chunks, in priority order
    token_budget: int              # total tokens T allowed (decodes + prefill budget)
    min_slack_s: float             # min over decodes of next-token deadline - now; inf without decodes
    preempted: list[Request] = field(default_factory=list)   # decodes evicted for KV before this batch
    relegated: list[Request] = field(default_factory=list)   # requests relegated while filling
    num_sampled_decodes: int = 0   # decodes whose token is drawn with temperature or penalties (Request.sampled)
    predicted_s: float = math.nan  # the scheduler's predicted batch time (nan: it has no predictor)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    @property
    def prefill_context(self) -> int:
        return sum(c.start for c in self.prefills)

    @property
    def num_sampled(self) -> int:
        """Rows drawn with temperature or penalties: sampled decodes and sampled prefills that complete."""
        return self.num_sampled_decodes + sum(c.completes_prefill and c.request.sampled for c in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + self.num_prefill_tokens

    @property
    def is_empty(self) -> bool:
        return self.num_decodes == 0 and not self.prefills
