"""The engine core: the scheduler and the model in a loop of their own, fed over two pipes.

The server runs it in its own process, so the HTTP side (JSON, SSE, detokenization) never holds the GIL
the model step needs; tests can run the same loop on a thread (`EngineClient.in_thread`). Nothing reads
engine state across the boundary: everything the HTTP side knows comes in messages (`niyama/messages.py`):

HTTP side -> engine (read between steps): AddRequest, Abort, ReportLoad, Shutdown.
Engine -> HTTP side: Ready (once, after the model loaded) or Fatal (it did not load; the process exits), then
    one StepOutputs per step and after commands that changed something (in its wire form: messages.py). Tier-rejecting requests' handlers
    wait for the verdict before they answer: `stats.admitted` lists those admitted; a rejected one gets an
    Output with status 429.

A request has one id everywhere: the HTTP side's, which the engine uses as its `request_id`, so the core
keeps no maps of its own: `engine.sequences` is the set of live requests, and each sequence counts the
tokens already sent (`Sequence.num_emitted`). The sequence alone decides that a request is finished.
"""

from __future__ import annotations

import logging
import math
import pickle
import signal
import time

from ..messages import Abort, AddRequest, Fatal, Output, Ready, ReportLoad, Shutdown, StepOutputs, StepRecord
from ..metrics.records import is_violated
from ..qos import DeadlineRule

log = logging.getLogger("niyama.engine")

__all__ = ["EngineCore", "Output", "rejection", "serve_engine"]


class EngineCore:
    def __init__(self, engine, commands, outputs):
        """`commands`: the readable end of the pipe from the HTTP side; `outputs`: the writable end back."""
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.pending: list[Output] = []         # outputs decided outside a step (refused adds, failures)
        self.awaiting_verdict: list[int] = []   # rids added in tiers that reject infeasible requests
        self.admitted: list[int] = []           # ... of which admitted, not told yet
        self.steps: list[StepRecord] = []       # what each step since the last message did (metrics)
        self.degraded: str | None = None
        self.load_period_s: float | None = None    # a LoadReport at most this often (None: never)
        self.load_due = False                      # send a load report with the next message, even if nothing else
        self.last_load_s = -math.inf
        engine.add_step_hook(self._observe)

    def run(self) -> None:
        try:
            while True:
                if not self._read(block=not self.engine.has_work):
                    return
                if self.engine.has_work:
                    self._step()
        except (EOFError, BrokenPipeError, ConnectionResetError):    # the HTTP side is gone: nothing to serve
            return
        finally:
            self.commands.close()
            self.outputs.close()

    # --- commands --------------------------------------------------------
    def _read(self, block: bool) -> bool:
        """Run the queued commands (waiting for one if `block`); False on shutdown."""
        if not self.commands.poll(None if block else 0):
            return True
        while True:
            cmd = self.commands.recv()
            if isinstance(cmd, Shutdown):
                return False
            try:
                match cmd:
                    case AddRequest():
                        self._add(cmd)
                    case Abort(rid, reason):
                        if (seq := self.engine.sequences.get(rid)) is not None:
                            self.engine.abort(seq, reason)
                    case ReportLoad(period_s):
                        self.load_period_s, self.load_due = period_s, True
                    case _:
                        raise TypeError(f"unknown engine command {type(cmd).__name__}")
            except Exception:      # a bug, not a bad request (the HTTP side validated it): keep serving
                log.exception("engine command %s failed", type(cmd).__name__)
                if isinstance(cmd, AddRequest):
                    self.pending.append(Output(cmd.rid, [], error="internal error: the engine could not add "
                                                                  "this request (the server log has the details)"))
            if not self.commands.poll(0):
                break
        self._admit()
        self._publish(self.engine.take_finished())
        return True

    def _admit(self) -> None:
        """Admission control right away, not at the next step: the handlers of tier-rejecting requests wait
        for the verdict before they answer. Admitted = still in the engine."""
        self.engine.admit()
        if self.awaiting_verdict:
            live = self.engine.sequences
            self.admitted += [rid for rid in self.awaiting_verdict if rid in live]
            self.awaiting_verdict = []

    def _add(self, cmd: AddRequest) -> None:
        engine = self.engine
        try:
            engine.add_request(cmd.prompt_ids, cmd.params, tier=cmd.tier, priority=cmd.priority,
                               arrival_s=engine.time_at(cmd.arrival), detokenize=False, request_id=cmd.rid)
        except ValueError as e:          # the engine's own checks (the HTTP side checks first)
            self.pending.append(Output(cmd.rid, [], error=str(e), status=400))
            return
        if cmd.tier.rejects_infeasible:
            self.awaiting_verdict.append(cmd.rid)

    # --- steps -----------------------------------------------------------
    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception:       # keep serving: fail the requests in flight, return their blocks
            log.exception("engine step failed")
            done = self._fail_all("internal error: the engine step running this request failed "
                                  "(the server log has the details)")
        self._publish(done)

    def _observe(self, plan, result, end_s: float) -> None:
        """Step hook: what the metrics need, as plain values."""
        start_s = end_s - result.duration_s
        self.steps.append(StepRecord(
            result.duration_s, plan.predicted_s, plan.token_budget if plan.prefills else None,
            plan.num_prefill_tokens + plan.num_decodes,
            [(c.request.tier.name, start_s - c.request.arrival_s, c.request.num_prompt_tokens, c.start)
             for c in plan.prefills if c.start == c.request.num_cached_tokens and c.request.num_preemptions == 0],
            [r.tier.name for r in plan.relegated], len(plan.preempted)))

    def _fail_all(self, message: str) -> list:
        engine = self.engine
        failed = engine.abort_all()
        self.pending += [Output(seq.request.request_id, [], error=message) for seq in failed]
        log.info("failed %d requests after the step's error", len(failed))
        try:
            engine.check_blocks()
        except AssertionError as e:
            log.error("KV blocks lost after a failed step: %s", e)
            self.degraded = f"KV blocks lost after a failed step: {e}"
        return []

    # --- messages out ----------------------------------------------------
    def _publish(self, done: list) -> None:
        out, self.pending = self.pending, []
        for seq in done:
            req, rid = seq.request, seq.request.request_id
            if req.rejected:
                out.append(rejection(rid, req))
                continue
            finished = seq.finish_reason in ("stop", "length") and req.first_token_s is not None
            sent = seq.num_emitted
            out.append(Output(rid, seq.output_ids[sent:], seq.finish_reason or "abort", req.relegated,
                              finished and is_violated(req),
                              logprobs=seq.logprobs[sent:] if seq.logprobs is not None else None))
        rids, tokens, logprobs = [], [], {}
        for rid, seq in self.engine.sequences.items():
            n = len(seq.output_ids)
            if n > seq.num_emitted:          # one token per step
                rids.append(rid)
                tokens.append(seq.output_ids[-1])
                seq.num_emitted = n
                if seq.logprobs is not None:
                    logprobs[rid] = seq.logprobs[-1]
        load = self._load_if_due()
        if not out and not rids and not self.steps and not self.admitted and load is None:
            return
        stats = self.engine.stats(self.steps, self.degraded, self.admitted, load)
        self.steps = []
        self.admitted = []
        wire = StepOutputs(rids, tokens, out, stats, logprobs).to_wire()
        self.outputs.send_bytes(pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL))

    def _load_if_due(self):
        """The load report, if one was asked for and the last is `load_period_s` old, or one is due now: asked
        for just now, or the engine has no work left (so that an idle replica never looks busy)."""
        if self.load_period_s is None:
            return None
        now = time.monotonic()
        if not self.load_due and self.engine.has_work and now - self.last_load_s < self.load_period_s:
            return None
        self.last_load_s, self.load_due = now, False
        return self.engine.load_report()


def rejection(rid: int, req) -> Output:
    """The 429 of a request that admission control refused, saying why and when to try again."""
    tier = req.tier
    target = (f"TTFT target of {tier.ttft_s:g} s" if tier.interactive else
              f"first-token deadline of {req.ttft_s:g} s (its TTLT of {tier.ttlt_s:g} s less the predicted output time)")
    late_s = req.predicted_first_token_s - req.first_token_deadline_s
    if math.isfinite(late_s):
        when = f"its first token {req.predicted_first_token_s - req.arrival_s:.1f} s after arrival"
        retry = max(1, math.ceil(late_s))
    else:                     # work of tighter tiers arrives faster than the replica serves it
        when = "that its first token would wait behind ever more work of tighter tiers"
        retry = 60
    return Output(rid, [], error=f"the server cannot meet this request's deadline now: the scheduler predicts "
                                 f"{when}, past the {tier.name} tier's {target}, and this tier rejects such "
                                 f"requests instead of accepting them late; retry in {retry} s or use a tier with "
                                 "a looser target", status=429, retry_after_s=retry)


def serve_engine(config, tiers, commands, outputs) -> None:
    """The engine process's main: load the model, say Ready (or Fatal), then run the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the HTTP side, which shuts us down
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..engine import LLMEngine

    try:
        engine = LLMEngine(config)
        engine.set_tiers(tiers, DeadlineRule())
    except Exception as e:
        log.exception("the engine did not start")
        outputs.send(Fatal(f"{type(e).__name__}: {e}"))
        return
    outputs.send(Ready(engine.info()))
    EngineCore(engine, commands, outputs).run()
