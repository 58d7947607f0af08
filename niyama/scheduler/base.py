"""The iteration every policy shares; policies fill in the blanks.

One call to `schedule(now, decodes, kv, iteration)`:
1. make KV room for this iteration's decode tokens, preempting (recompute)
   the decode with the latest next-token deadline while blocks run out;
2. every running decode goes into the batch, one token each;
3. the policy picks a token budget (`token_budget`);
4. the prefill budget (budget - decodes) is filled from the waiting queue in
   the policy's order, several requests if they fit; when a request that has
   not started comes up, the policy may relegate it, and other waiting
   requests with it (`relegations`); relegated requests go back behind
   every non-relegated one; starting a prefill takes its KV blocks (sharing
   its cached prefix, which it then skips) and needs a free `max_num_seqs` slot;
5. a `BatchPlan` comes back. No clock is read and no tensor is touched.
After the batch runs, the replica hands back paused prefills (`requeue`) and
the measured batch (`observe`, which also keeps the observed prefill rate).

Admission (`predicted_first_token_s`): when a request arrives in a tier that
rejects infeasible requests, the replica asks when its first token would
come: after the prefill work queued ahead of it in this policy's order, at
the observed prefill rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kv import BlockAllocator
from ..predictor import BatchTimePredictor
from ..request import Phase, Request
from ..running import RunningDecodes
from .batch_plan import BatchPlan, PrefillChunk
from .queue import OrderKey, WaitingQueue
from .relegation import ArrivalWork, PrefillRate, ThroughputWhileWaiting, wait_with_arrivals


ADMISSION_PROBE_TOKENS = 512     # the prefill-only step whose predicted time starts admission's rate


@dataclass
class SchedulerConfig:
    chunk_size: int = 256          # fixed token budget per iteration (Sarathi baselines)
    max_num_seqs: int = 256        # cap on requests holding KV (decodes + started prefills)
    prefill_rate_init: float = 8500.0      # tokens/s, before anything is observed
    prefill_rate_decay: float = 0.995      # EMA weight on the old value
    foresee_arrivals: bool = False         # admission also counts tighter tiers' work still to arrive (rejects more)
    # a waiting request that cannot start (no max_num_seqs slot, no KV room) preempts running decodes whose next
    # token is due at least this much later than its first token (a batch line hours from its window's end
    # makes way for a chat request); 0 = never (Sarathi's behaviour: it waits for a decode to finish)
    preempt_for_urgent_s: float = 0.0
    # admission predicts with the prefill throughput while work waits (decode-only steps included); False: with
    # the per-step prefill rate relegation uses (before issue 29; kept for the comparison)
    admission_counts_waiting_steps: bool = True

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.preempt_for_urgent_s < 0:
            raise ValueError("preempt_for_urgent_s must be >= 0 (0 = off)")

    @property
    def max_batch_tokens(self) -> int:
        """The most tokens one plan can hold: every decode, or the largest budget (the engine sizes memory by it)."""
        return max(self.max_num_seqs, self.chunk_size)


class Scheduler:
    name = "base"
    relegates_late_work = False    # does `relegations` shed requests that are too late?

    def __init__(self, config: SchedulerConfig, order: OrderKey, predictor: BatchTimePredictor | None = None):
        """`predictor`: what each plan's `predicted_s` comes from (and, for niyama, its chunk sizes)."""
        self.config = config
        self.predictor = predictor
        self.waiting = WaitingQueue(order)
        self.prefill_rate = PrefillRate(config.prefill_rate_init, config.prefill_rate_decay)
        # admission's rate starts from what the batch-time model says a prefill-only step does, when there is one
        initial = config.prefill_rate_init
        if predictor is not None:
            initial = ADMISSION_PROBE_TOKENS / predictor.batch_time(ADMISSION_PROBE_TOKENS, 0, 0, 0, 0)
        self.admission_rate = ThroughputWhileWaiting(initial, config.prefill_rate_decay)
        self.arrivals = ArrivalWork() if config.foresee_arrivals else None

    @property
    def max_batch_tokens(self) -> int:
        return self.config.max_batch_tokens

    # --- policy hooks ----------------------------------------------------
    def token_budget(self, now: float, decodes: RunningDecodes, iteration: int, min_slack: float,
                     kv: BlockAllocator) -> int:
        """Total tokens (decodes + prefill) this iteration may run."""
        return self.config.chunk_size

    def relegations(self, now: float, req: Request) -> list[Request]:
        """Requests to relegate now that `req` (not started, not relegated) is up: none, `[req]`,
        or `req` with other waiting requests the policy took out of the queue."""
        return []

    def observe(self, plan: BatchPlan, duration_s: float) -> None:
        """The batch of `plan` took `duration_s`."""
        self.prefill_rate.observe(plan.num_prefill_tokens, duration_s)
        if plan.num_prefill_tokens or self.waiting:
            self.admission_rate.observe(plan.num_prefill_tokens, duration_s)

    def predicted_first_token_s(self, now: float, req: Request) -> float:
        """When `req` (arriving now, not queued yet) would emit its first token if admitted: after the prefill
        work queued ahead of it in this policy's order, at the prefill throughput observed while work waits
        (decode-only steps between chunks included). A policy that relegates late work skips the requests whose
        key is already below `now` (past their deadline: they will be relegated when they come up). Later
        arrivals that will sort ahead of `req` are not foreseen."""
        rate = (self.admission_rate if self.config.admission_counts_waiting_steps else self.prefill_rate).tokens_per_s
        since = (False, now) if self.relegates_late_work else None
        ahead_s = (self.waiting.work_before(self.waiting.key(req), since) + req.num_remaining_prefill) / rate
        if self.arrivals is None:
            return now + ahead_s
        # a tier with a tighter TTFT_eff d sorts its arrivals of the next (deadline - d - now) s ahead of `req`;
        # they are expected at the rate of as long a past as that future
        deadline = req.first_token_deadline_s
        horizon = deadline - now
        lanes = [(deadline - ttft - now, tokens_per_s / rate)
                 for ttft, tokens_per_s in self.arrivals.rates(now, horizon)]
        return now + wait_with_arrivals(ahead_s, lanes)

    # --- queue -----------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """`req` arrived (and was admitted)."""
        if self.arrivals is not None:
            self.arrivals.observe(req)
        self.waiting.push(req)

    def requeue(self, req: Request) -> None:
        """A prefill paused between chunks goes back and is re-ranked."""
        self.waiting.push(req)

    # --- the iteration ---------------------------------------------------
    def schedule(self, now: float, decodes: RunningDecodes, kv: BlockAllocator, iteration: int) -> BatchPlan:
        preempted = self._make_room_for_decodes(decodes, kv, iteration)
        if self.config.preempt_for_urgent_s and self.waiting:
            preempted += self._make_room_for_urgent(now, decodes, kv, iteration)
        num_decodes = len(decodes)
        decode_context = decodes.context_sum(iteration)
        min_slack = decodes.min_deadline(iteration) - now
        budget = num_decodes
        prefills: list[PrefillChunk] = []
        relegated: list[Request] = []
        if self.waiting:
            budget = max(num_decodes, self.token_budget(now, decodes, iteration, min_slack, kv))
            prefills, relegated = self._fill(now, budget - num_decodes, kv, num_decodes)
        plan = BatchPlan(iteration, num_decodes, decode_context, prefills, budget, min_slack, preempted, relegated,
                         decodes.num_sampled)
        if self.predictor is not None:       # once, here: the engine's metrics and online correction read it
            plan.predicted_s = self.predictor.batch_time(plan.num_prefill_tokens, num_decodes, decode_context,
                                                         plan.prefill_context, plan.num_sampled)
        self._check(plan, decodes)
        return plan

    def _make_room_for_decodes(self, decodes: RunningDecodes, kv: BlockAllocator, iteration: int) -> list[Request]:
        needing = decodes.needing_block(iteration)
        preempted = []
        while len(needing) > kv.num_free:
            victim = decodes.latest_deadline(iteration)
            self._preempt(victim, decodes, kv, iteration)
            preempted.append(victim)
            if victim in needing:
                needing.remove(victim)
        for req in needing:
            kv.allocate(req, 1)
        return preempted

    def _make_room_for_urgent(self, now: float, decodes: RunningDecodes, kv: BlockAllocator,
                              iteration: int) -> list[Request]:
        """The first waiting request, if it has not started, is not late, and lacks a slot or KV room: preempt
        the decodes due last while each is due `preempt_for_urgent_s` after its first token and it still
        lacks room. Without this a long-deadline backlog (a batch job's lines) holding every slot makes a chat
        request wait until it is late, and then be relegated behind that very backlog."""
        req = self.waiting.peek()
        if req is None or req.started or req.relegated or req.first_token_deadline_s <= now:
            return []
        req.num_cached_tokens = kv.cached_tokens(req)
        due = req.first_token_deadline_s + self.config.preempt_for_urgent_s
        preempted = []
        while decodes and (len(decodes) + self.waiting.num_started >= self.config.max_num_seqs
                           or kv.shortfall(req) > 0):
            victim = decodes.latest_deadline(iteration)
            if decodes.next_deadline(victim, iteration) < due:
                break
            self._preempt(victim, decodes, kv, iteration)
            preempted.append(victim)
        return preempted

    def _preempt(self, req: Request, decodes: RunningDecodes, kv: BlockAllocator, iteration: int) -> None:
        """Recompute preemption: drop the KV, re-prefill prompt + generated tokens later."""
        decodes.remove(req, iteration)
        kv.release(req)                  # its computed blocks stay cached: the re-prefill may find them
        req.num_preemptions += 1
        req.move_to(Phase.WAITING)
        req.num_prefill_target = req.num_prompt_tokens + req.num_output_tokens
        req.num_computed_tokens = 0
        req.num_cached_tokens = kv.cached_tokens(req)
        self.waiting.push(req)

    def _fill(self, now: float, prefill_budget: int, kv: BlockAllocator,
              num_decodes: int) -> tuple[list[PrefillChunk], list[Request]]:
        chunks: list[PrefillChunk] = []
        relegated: list[Request] = []
        held: list[Request] = []
        num_running = num_decodes + self.waiting.num_started
        admissions_blocked = False
        left = prefill_budget
        while left > 0:
            req = self.waiting.pop(started_only=admissions_blocked)
            if req is None:
                break
            if not req.started:
                req.num_cached_tokens = kv.cached_tokens(req)    # what is cached now, not when it was queued
                # a preempted decode re-prefilling has started before: never relegated
                if not req.relegated and req.first_token_s is None:
                    shed = self.relegations(now, req)
                    for r in shed:
                        r.relegated = True
                        relegated.append(r)
                        self.waiting.push(r)   # behind every non-relegated request
                    if req in shed:
                        continue
                if num_running >= self.config.max_num_seqs or not kv.start(req):
                    held.append(req)
                    admissions_blocked = True  # only started prefills may still run
                    continue
                req.move_to(Phase.PREFILL)
                num_running += 1
            n = min(left, req.num_remaining_prefill)
            chunks.append(PrefillChunk(req, req.num_computed_tokens, n))
            left -= n
        for req in held:
            self.waiting.push(req)
        return chunks, relegated

    def _check(self, plan: BatchPlan, decodes: RunningDecodes) -> None:
        assert plan.token_budget >= plan.num_tokens, "plan exceeds its token budget"
        num_running = len(decodes) + self.waiting.num_started + len(plan.prefills)
        assert num_running <= self.config.max_num_seqs, f"{num_running} running > max_num_seqs"
        seen = set()
        for c in plan.prefills:
            assert c.num_tokens >= 1 and c.start + c.num_tokens <= c.request.num_prefill_target
            assert c.request not in seen, "request scheduled twice"
            seen.add(c.request)
