"""niyama: dynamic chunking + hybrid priority + eager relegation.

- Token budget: the largest candidate T (128 ... 2552 total tokens) whose
  predicted batch time x `safety_factor` fits in `min_slack`, the time to
  the earliest next-token deadline of the running decodes (binary search).
  No decodes: the largest. With fewer than `low_memory_tokens` KV tokens
  free the candidates shrink to 128..512.
- Late recovery (`min_slack <= 0`): a late decode's lost time is sunk. The
  smallest chunk buys it back only at (pace - step) per step, not at all
  when that step is slower than the pace, and it starves every prefill. So
  a late decode is re-anchored at `now`: the step may take its pace (TBT),
  the decodes still on time their slack; the largest candidate that fits
  both. If no candidate keeps the pace, every step loses ground: of those
  fitting the on-time slack, the one losing the least per prefill token,
  (predicted - pace) / (T - decodes); the smallest if none fits.
  `late_recovery=False`: the smallest candidate (the artifact's rule).
- Queue order: `arrival + TTFT_eff + alpha * remaining_prefill_tokens`
  (alpha = 0 is EDF; large alpha tends to shortest-remaining-first). The
  remaining work is what the prefix cache leaves (so among requests of
  similar urgency one whose prefix is resident goes first);
  `prefix_aware_order=False` counts the whole prompt.
- Eager relegation: a request that has not started is relegated when
  `now + remaining_prefill / prefill_rate` is past its first-token deadline;
  relegated requests sort after all others and are still completed.
- Priority hints: `low` requests are relegated first. A request
  that is too late is relegated whatever its priority; when it is
  `important`, waiting `low` requests carrying at least as much prefill work
  are relegated with it (most urgent first), so that the important requests
  behind it find the room. (the paper words it as "important only when no low is
  left"; keeping a hopeless important request at the head instead made the
  next ones late too and doubled important violations under overload: see
  the overload experiment in docs/experiments.md.)
Ablations switch the parts off: `dynamic_chunking=False` uses the fixed
`chunk_size`; `relegation=False`; `priority_relegation=False`; `alpha_s=0`;
`late_recovery=False`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kv import BlockAllocator
from ..predictor import BatchTimePredictor
from ..qos import Priority
from ..request import Request
from ..running import RunningDecodes
from .base import Scheduler, SchedulerConfig
from .relegation import too_late

CHUNK_CANDIDATES = (128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2552)
LOW_MEMORY_CANDIDATES = (128, 256, 384, 512)


@dataclass
class NiyamaConfig(SchedulerConfig):
    dynamic_chunking: bool = True
    relegation: bool = True
    priority_relegation: bool = True       # a late `important` request takes waiting `low` ones with it
    alpha_s: float = 0.008                 # hybrid priority weight, seconds per remaining prefill token
    safety_factor: float = 1.2             # predicted time is multiplied by this before comparing to slack
    chunk_candidates: tuple[int, ...] = CHUNK_CANDIDATES
    low_memory_candidates: tuple[int, ...] = LOW_MEMORY_CANDIDATES
    low_memory_tokens: int = 32_000        # below this many free KV tokens, use the low-memory candidates
    late_recovery: bool = True             # late decodes ask for their pace, not for the smallest candidate
    prefix_aware_order: bool = True        # the hybrid key counts the prefill work the prefix cache leaves
    preempt_for_urgent_s: float = 3600.0   # base.py: a blocked request preempts decodes due an hour later (batch)

    def __post_init__(self):
        super().__post_init__()
        if self.alpha_s < 0:
            raise ValueError("alpha_s must be >= 0")
        if self.safety_factor <= 0:
            raise ValueError("safety_factor must be > 0")
        for cands in (self.chunk_candidates, self.low_memory_candidates):
            if not cands or list(cands) != sorted(set(cands)) or cands[0] < 1:
                raise ValueError(f"chunk candidates must be increasing positive integers, got {cands}")

    @property
    def max_batch_tokens(self) -> int:
        budgets = self.chunk_candidates + self.low_memory_candidates if self.dynamic_chunking else (self.chunk_size,)
        return max(self.max_num_seqs, *budgets)


class NiyamaScheduler(Scheduler):
    def __init__(self, config: NiyamaConfig, predictor: BatchTimePredictor, name: str = "niyama"):
        alpha = config.alpha_s
        if config.prefix_aware_order:
            order = lambda r: r.arrival_s + r.ttft_s + alpha * r.num_remaining_prefill
        else:
            order = lambda r: r.arrival_s + r.ttft_s + alpha * (r.num_prefill_target - r.num_computed_tokens)
        super().__init__(config, order, predictor)
        self.config: NiyamaConfig = config
        self.name = name

    @property
    def relegates_late_work(self) -> bool:
        return self.config.relegation

    def token_budget(self, now: float, decodes: RunningDecodes, iteration: int, min_slack: float,
                     kv: BlockAllocator) -> int:
        cfg = self.config
        if not cfg.dynamic_chunking:
            return cfg.chunk_size
        num_decodes, decode_context = len(decodes), decodes.context_sum(iteration)
        low_memory = kv.num_free * kv.block_size < cfg.low_memory_tokens
        cands = cfg.low_memory_candidates if low_memory else cfg.chunk_candidates
        head = self.waiting.peek()
        prefill_context = head.num_prefill_target - head.num_remaining_prefill if head is not None else 0
        num_sampled = decodes.num_sampled
        predicted_s = lambda total: self.predictor.batch_time(max(0, total - num_decodes), num_decodes,
                                                              decode_context, prefill_context, num_sampled)
        if min_slack > 0:
            return self._largest_fitting(cands, min_slack, predicted_s) or cands[0]
        if not cfg.late_recovery:
            return cands[0]
        return self._late_budget(now, decodes.late_split(now, iteration), cands, num_decodes, predicted_s)

    def _late_budget(self, now: float, late_split: tuple[float, float], cands: tuple[int, ...], num_decodes: int,
                     predicted_s) -> int:
        """Some decode is late. Its lost time is sunk: re-anchored at `now`, it needs the step to take at most
        its pace, and a decode still on time needs its slack. If no candidate keeps the pace, every step loses
        ground: lose the least per prefill token."""
        ahead, pace = late_split
        fitting = self._largest_fitting(cands, min(ahead - now, pace), predicted_s)
        if fitting:
            return fitting
        safe = ahead - now
        room = [t for t in cands if t > num_decodes and predicted_s(t) * self.config.safety_factor <= safe]
        if not room:
            return cands[0]
        return min(room, key=lambda t: (predicted_s(t) - pace) / (t - num_decodes))

    def _largest_fitting(self, cands: tuple[int, ...], slack: float, predicted_s) -> int | None:
        """The largest candidate whose predicted step x `safety_factor` fits `slack`: a binary search."""
        best, lo, hi = None, 0, len(cands) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if predicted_s(cands[mid]) * self.config.safety_factor <= slack:
                best, lo = cands[mid], mid + 1
            else:
                hi = mid - 1
        return best

    def relegations(self, now: float, req: Request) -> list[Request]:
        if not self.config.relegation or not too_late(now, req, self.prefill_rate):
            return []
        if req.priority is Priority.LOW or not self.config.priority_relegation:
            return [req]
        shed, work = [req], 0
        while work < req.num_remaining_prefill:
            low = self.waiting.pop_low()
            if low is None:
                break
            shed.append(low)
            work += low.num_remaining_prefill
        return shed
