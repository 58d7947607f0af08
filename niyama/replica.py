"""The replica loop, the same in simulation and on a GPU:

    plan   = scheduler.schedule(now, decodes, kv, iteration)   # pure CPU decision
    result = executor.execute(plan, decodes)                    # GPU model, or a timing model
    apply(plan, result)                                         # tokens out, states advance

The executor decides what time means: the simulated executor returns a
predicted duration and the virtual clock jumps by it; the model runner
returns the measured duration of work that really took that long.

The loop keeps nothing that grows with time: a server runs it for days.
What only a report needs (every step's end time, the finished requests,
counters) goes to a `Recorder` that the simulator and replay attach.

Who decides that a request is finished: its executor. The model runner's
sequence ends it (a stop token, its max_tokens) and the step's result says
so; the simulated executor ends none, and there a request ends when it has
made its trace's output length (the running decodes' finish heap). With an
executor that ends requests, the heap must agree: it may only find requests
the executor already ended (checked while assertions are on).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .kv import BlockAllocator
from .request import Phase, Request
from .running import RunningDecodes
from .scheduler import BatchPlan, Scheduler


@dataclass
class StepResult:
    duration_s: float                                       # batch time, predicted or measured
    finished: list[Request] = field(default_factory=list)   # requests the executor ended in this step


class Executor(Protocol):
    ends_requests: bool     # True: the executor decides every request's end (StepResult.finished)

    def execute(self, plan: BatchPlan, decodes: RunningDecodes) -> StepResult: ...

    def release(self, req: Request) -> None:
        """`req` finished (or was aborted): drop whatever the executor keeps for it."""


class VirtualClock:
    """Simulated time: jumps by each batch's duration, and to the next arrival when idle."""

    def __init__(self, start: float = 0.0):
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, duration_s: float) -> None:
        self._now += duration_s

    def wait_until(self, t: float) -> None:
        self._now = max(self._now, t)


class WallClock:
    """Real time since construction; the work itself makes time pass."""

    def __init__(self):
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def at(self, monotonic_s: float) -> float:
        """This clock's reading at `time.monotonic()` == `monotonic_s` (the same in every process)."""
        return monotonic_s - self._t0

    def advance(self, duration_s: float) -> None:
        pass

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class Recorder:
    """What a run's report needs, kept as the loop runs: attached by the simulator and replay, never by the
    server (it would grow for as long as the server runs)."""

    def __init__(self, first_iteration: int = 0):
        """`first_iteration`: the replica's iteration when recording starts (token segments index by it)."""
        self.iteration_end_s: list[float] = [math.nan] * first_iteration    # token times come from here (running.py)
        self.finished: list[Request] = []
        self.num_preemptions = 0
        self.num_relegations = 0
        self.num_rejections = 0

    def step(self, plan: BatchPlan, end_s: float) -> None:
        self.iteration_end_s.append(end_s)
        self.num_preemptions += len(plan.preempted)
        self.num_relegations += len(plan.relegated)

    def finish(self, req: Request) -> None:
        self.finished.append(req)
        self.num_rejections += req.rejected


class Replica:
    def __init__(self, scheduler: Scheduler, executor: Executor, kv: BlockAllocator, clock=None,
                 recorder: Recorder | None = None):
        self.scheduler = scheduler
        self.executor = executor
        self.kv = kv
        self.clock = clock or VirtualClock()
        self.decodes = RunningDecodes(kv.block_size)
        self.iteration = 0
        self.recorder = recorder
        self.on_step: list[Callable[[BatchPlan, StepResult, float], None]] = []
        self._pending: list = []                  # heap of (arrival, id, request) not yet arrived
        self._num_added = 0
        self._num_finished = 0

    # --- requests --------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request; it joins the scheduler at its arrival time."""
        need = self.kv.blocks_for(req.num_prompt_tokens + req.max_output_tokens)
        room = self.kv.num_blocks - self.kv.num_watermark_blocks
        if need > room:
            raise ValueError(f"request {req.request_id}: {req.num_prompt_tokens}+{req.max_output_tokens} tokens "
                             f"need {need} KV blocks, the cache has {room} usable")
        self._num_added += 1
        heapq.heappush(self._pending, (req.arrival_s, self._num_added, req))

    def admit_arrivals(self, now: float | None = None) -> None:
        """Hand every request that has arrived to the scheduler. In a tier that rejects infeasible requests,
        one whose predicted first token is past its deadline finishes at once, rejected."""
        now = self.clock.now() if now is None else now
        pending = self._pending
        while pending and pending[0][0] <= now:
            req = heapq.heappop(pending)[2]
            req.num_cached_tokens = self.kv.cached_tokens(req)     # its work is what the cache does not hold
            if req.tier.rejects_infeasible:
                req.predicted_first_token_s = self.scheduler.predicted_first_token_s(now, req)
                if req.predicted_first_token_s > req.first_token_deadline_s:
                    req.rejected = True
                    self._finish(req, now)
                    continue
            self.scheduler.add_request(req)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self.scheduler.waiting or self.decodes)

    @property
    def num_unfinished(self) -> int:
        return self._num_added - self._num_finished

    def abort(self, req: Request) -> bool:
        """Stop `req` between iterations wherever it is (not arrived, waiting, paused prefill, decoding) and
        free its KV blocks; it finishes like any other request. False if it had already finished."""
        if req.phase is Phase.DONE:
            return False
        if req in self.decodes:
            self.decodes.remove(req, self.iteration)
        elif not self.scheduler.waiting.remove(req):
            entries = [e for e in self._pending if e[2] is not req]
            if len(entries) == len(self._pending):
                raise ValueError(f"request {req.request_id} is not in this replica")
            self._pending = entries
            heapq.heapify(self._pending)
        self._finish(req, self.clock.now())
        return True

    # --- the loop --------------------------------------------------------
    def step(self) -> BatchPlan | None:
        """Run one iteration; when there is nothing to run, wait for the next arrival."""
        now = self.clock.now()
        self.admit_arrivals(now)
        if not self.scheduler.waiting and not self.decodes:
            if self._pending:
                self.clock.wait_until(self._pending[0][0])
            return None
        plan = self.scheduler.schedule(now, self.decodes, self.kv, self.iteration)
        if plan.is_empty:
            raise RuntimeError(f"scheduler made no progress at t={now:.3f} with {len(self.scheduler.waiting)} "
                               f"waiting and {self.kv.num_free} free KV blocks")
        try:
            result = self.executor.execute(plan, self.decodes)
        except Exception:
            # the batch did not run: paused prefills go back to the queue (decodes never left their set),
            # so that every request is still somewhere `abort` finds it and no block is lost
            for chunk in plan.prefills:
                self.scheduler.requeue(chunk.request)
            raise
        self.clock.advance(result.duration_s)
        end = self.clock.now()
        self._apply(plan, result, end)
        self.scheduler.observe(plan, result.duration_s)
        for hook in self.on_step:
            hook(plan, result, end)
        return plan

    def live_requests(self):
        """Every request the replica holds: not yet arrived, waiting or paused, decoding."""
        yield from (entry[2] for entry in self._pending)
        yield from self.scheduler.waiting
        yield from self.decodes

    def check_blocks(self) -> None:
        """KV conservation: every block is free or held by exactly one live request (AssertionError if not)."""
        self.kv.check(self.live_requests())

    def run(self, progress=None) -> None:
        """Step until every added request finished. `progress(n)` gets the finished count."""
        while self.has_work:
            self.step()
            if progress is not None:
                progress(self._num_finished)

    def _apply(self, plan: BatchPlan, result: StepResult, end: float) -> None:
        i = self.iteration
        if self.recorder is not None:
            self.recorder.step(plan, end)
        ended, ends = result.finished, self.executor.ends_requests
        for chunk in plan.prefills:
            req = chunk.request
            req.num_computed_tokens += chunk.num_tokens
            self.kv.commit(req, req.num_computed_tokens)      # its full blocks can be shared from now on
            if req.num_computed_tokens < req.num_prefill_target:
                self.scheduler.requeue(req)
                continue
            req.num_output_tokens += 1               # the prefill's last chunk emits a token
            if req.first_token_s is None:
                req.first_token_s = end
                req.anchor_s = max(end, req.first_token_deadline_s)
            req.token_segments.append([i, i + 1])
            if ends:
                if req not in ended:                 # (the ended finish below)
                    self.decodes.add(req, i)
            elif req.num_output_tokens >= req.max_output_tokens:
                self._finish(req, end)
            else:
                self.decodes.add(req, i)
        for req in ended:
            if req in self.decodes:
                self.decodes.remove(req, i + 1)
            self._finish(req, end)
        late = self.decodes.pop_finished(i)
        assert not (late and ends), \
            f"requests {[r.request_id for r in late]} reached max tokens but their executor did not end them"
        for req in late:
            self._finish(req, end)
        self.iteration = i + 1

    def _finish(self, req: Request, end: float) -> None:
        self.kv.release(req)                 # (before DONE: what it computed depends on its phase)
        req.block_keys = None                # its keys are not needed again (a long trace's run keeps its requests)
        req.move_to(Phase.DONE)
        req.finish_s = end
        self.executor.release(req)
        if self.recorder is not None:
            self.recorder.finish(req)
        self._num_finished += 1
