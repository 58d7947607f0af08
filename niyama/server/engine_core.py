"""The engine core: the scheduler and the model in a loop of their own, fed over two pipes.

The server runs it in its own process, so the HTTP side (JSON, SSE, detokenization) never holds the GIL
the model step needs; tests can run the same loop on a thread (`EngineClient.in_thread`). Nothing reads
engine state across the boundary: everything the HTTP side knows comes in messages.

HTTP side -> engine (commands, read between steps):
    ("add", rid, prompt_ids, SamplingParams, Tier, Priority, arrival)   arrival: time.monotonic() at the API
    ("abort", rid, reason)       the client left ("abort"), or a stop string ended the text ("stop")
    ("load", period_s)           put the replica's load (`load_report`) in stats["load"], at most every
                                 period_s while it has work (a router's input; off unless asked)
    ("shutdown",)
Engine -> HTTP side (one message per step, and after commands that changed something):
    ("ready", info)              once, after the model loaded (`engine_info`)
    ("fatal", message)           the model did not load; the process exits
    ("out", rids, tokens, [Output, ...], stats, logprobs)
                                 rids[i] made tokens[i] in this step (running requests make one token per
                                 step); logprobs[rid]: that token's log-probabilities, for requests that
                                 asked for them; each finished request's last tokens come in an Output;
                                 stats["admitted"]: the rids of tier-rejecting requests that were admitted
                                 (a rejected one gets an Output with status 429), so that their handlers
                                 can wait for the verdict before answering

Every request the engine accepts gets exactly one `Output` (a finish reason or an error), also when it
was aborted: the HTTP side records its metrics from that. Running requests' tokens travel as two flat
lists because pickling them is ~10x cheaper than an object per request (benchmarks/ipc_bench.py).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import NamedTuple

from ..metrics.records import is_violated
from ..qos import DeadlineRule
from ..request import Request

log = logging.getLogger("niyama.engine")


class Output(NamedTuple):
    """A request's end."""
    rid: int
    token_ids: list[int]              # tokens not sent yet
    finish_reason: str | None = None  # "stop", "length", "abort"; None with `error`
    relegated: bool = False           # the scheduler relegated it
    violated: bool = False            # it missed its tier's target (TTFT or TTLT)
    error: str | None = None          # the request failed; `status` is the HTTP status to send
    status: int = 500
    retry_after_s: int | None = None  # a rejected request may try again after this long
    logprobs: list | None = None      # the log-probabilities of `token_ids`, if the request asked for them


def engine_info(engine) -> dict:
    """What the HTTP side needs to know about the engine, sent once when it is ready."""
    kv = engine.allocator
    return {"model_name": engine.model_name, "describe": engine.describe(), "tokenizer_path": engine.tokenizer_path,
            "eos_token_ids": tuple(engine.eos_token_ids), "max_position": engine.model_config.max_position,
            "vocab_size": engine.model_config.vocab_size, "kv_blocks": kv.num_blocks,
            "sampling_defaults": engine.sampling_defaults,
            "kv_tokens": (kv.num_blocks - kv.num_watermark_blocks) * kv.block_size}


class EngineCore:
    def __init__(self, engine, commands, outputs):
        """`commands`: the readable end of the pipe from the HTTP side; `outputs`: the writable end back."""
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.live: dict[int, object] = {}       # rid -> Sequence
        self.sent: dict[int, int] = {}          # rid -> output tokens already sent
        self.rid_of: dict[object, int] = {}     # Request -> rid
        self.pending: list[Output] = []         # outputs decided outside a step (refused adds, failures)
        self.awaiting_verdict: list[int] = []   # rids added in tiers that reject infeasible requests
        self.admitted: list[int] = []           # ... of which admitted, not told yet
        self.steps: list[dict] = []             # what each step since the last message did (metrics)
        self.degraded: str | None = None
        self.load_period_s: float | None = None    # stats["load"] at most this often (None: never)
        self.load_due = False                      # send a load report with the next message, even if nothing else
        self.last_load_s = -math.inf
        engine.replica.on_step.insert(0, self._observe)     # before the online correction learns from the step

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
            if cmd[0] == "shutdown":
                return False
            try:
                if cmd[0] == "add":
                    self._add(*cmd[1:])
                elif cmd[0] == "load":
                    self.load_period_s, self.load_due = cmd[1], True
                else:
                    self._abort(*cmd[1:])
            except Exception:      # a bug, not a bad request (the HTTP side validated it): keep serving
                log.exception("engine command %s failed", cmd[0])
                if cmd[0] == "add":
                    self.pending.append(Output(cmd[1], [], error="internal error: the engine could not add "
                                                                "this request (the server log has the details)"))
            if not self.commands.poll(0):
                break
        self._admit()
        self._publish(self.engine.take_finished())
        return True

    def _admit(self) -> None:
        """Admission control right away, not at the next step: the handlers of tier-rejecting requests wait
        for the verdict before they answer."""
        self.engine.replica.admit_arrivals()
        if self.awaiting_verdict:
            live = self.live
            self.admitted += [rid for rid in self.awaiting_verdict
                              if rid in live and not live[rid].request.rejected]
            self.awaiting_verdict = []

    def _add(self, rid, prompt_ids, params, tier, priority, arrival) -> None:
        engine = self.engine
        try:
            seq = engine.add_request(prompt_ids, params, tier=tier, priority=priority,
                                     arrival_s=engine.replica.clock.at(arrival), detokenize=False)
        except ValueError as e:          # the engine's own checks (the HTTP side checks first)
            self.pending.append(Output(rid, [], error=str(e), status=400))
            return
        self.live[rid] = seq
        self.sent[rid] = 0
        self.rid_of[seq.request] = rid
        if tier.rejects_infeasible:
            self.awaiting_verdict.append(rid)

    def _abort(self, rid, reason) -> None:
        seq = self.live.get(rid)
        if seq is not None:
            self.engine.abort(seq, reason)

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
        """Replica hook after each step: what the metrics need, as plain values."""
        start_s = end_s - result.duration_s
        predicted = self.engine.predictor.batch_time(plan.num_prefill_tokens, plan.num_decodes,
                                                     plan.decode_context, plan.prefill_context, plan.num_sampled)
        self.steps.append({
            "duration_s": result.duration_s,
            "predicted_s": predicted,         # what the scheduler planned this step to take
            "budget": plan.token_budget if plan.prefills else None,
            "tokens": plan.num_prefill_tokens + plan.num_decodes,
            "queue_s": [(c.request.tier.name, start_s - c.request.arrival_s) for c in plan.prefills
                        if c.start == 0 and c.request.num_preemptions == 0],
            "relegated": [r.tier.name for r in plan.relegated],
            "preempted": len(plan.preempted)})

    def _fail_all(self, message: str) -> list:
        engine = self.engine
        for rid, seq in self.live.items():
            try:
                engine.abort(seq)
            except Exception:
                log.exception("abort after a failed step")
            self.pending.append(Output(rid, [], error=message))
        log.info("failed %d requests after the step's error", len(self.live))
        self.live.clear()
        self.sent.clear()
        self.rid_of.clear()
        engine.take_finished()
        try:
            engine.replica.check_blocks()
        except AssertionError as e:
            log.error("KV blocks lost after a failed step: %s", e)
            self.degraded = f"KV blocks lost after a failed step: {e}"
        return []

    # --- messages out ----------------------------------------------------
    def _publish(self, done: list) -> None:
        out, self.pending = self.pending, []
        for seq in done:
            rid = self.rid_of.pop(seq.request, None)
            if rid is None:
                continue
            del self.live[rid]
            req = seq.request
            if req.rejected:
                self.sent.pop(rid)
                out.append(rejection(rid, req))
                continue
            finished = seq.finish_reason in ("stop", "length") and req.first_token_s is not None
            sent = self.sent.pop(rid)
            out.append(Output(rid, seq.output_ids[sent:], seq.finish_reason or "abort", req.relegated,
                              finished and is_violated(req),
                              logprobs=seq.logprobs[sent:] if seq.logprobs is not None else None))
        rids, tokens, logprobs, sent = [], [], {}, self.sent
        for rid, seq in self.live.items():
            n = len(seq.output_ids)
            if n > sent[rid]:          # one token per step
                rids.append(rid)
                tokens.append(seq.output_ids[-1])
                sent[rid] = n
                if seq.logprobs is not None:
                    logprobs[rid] = seq.logprobs[-1]
        load = self._load_if_due()
        if not out and not rids and not self.steps and not self.admitted and load is None:
            return
        engine, kv = self.engine, self.engine.allocator
        waiting, started = len(engine.scheduler.waiting), engine.scheduler.waiting.num_started
        stats = {"time": time.monotonic(), "steps": self.steps, "kv_free": kv.num_free, "kv_blocks": kv.num_blocks,
                 "running": len(engine.replica.decodes) + started, "waiting": waiting - started,
                 "degraded": self.degraded, "admitted": self.admitted,
                 "correction": getattr(engine.predictor, "ratios", None)}
        if load is not None:
            stats["load"] = load
        self.steps = []
        self.admitted = []
        self.outputs.send(("out", rids, tokens, out, stats, logprobs))

    def _load_if_due(self) -> dict | None:
        """The load report, if one was asked for and the last is `load_period_s` old, or one is due now: asked
        for just now, or the engine has no work left (so that an idle replica never looks busy)."""
        if self.load_period_s is None:
            return None
        now = time.monotonic()
        if not self.load_due and self.engine.has_work and now - self.last_load_s < self.load_period_s:
            return None
        self.last_load_s, self.load_due = now, False
        return load_report(self.engine, ((seq.request, len(seq.output_ids)) for seq in self.live.values()))


def load_report(engine, live) -> dict:
    """What a router weighs this replica by (`live`: (Request, output tokens made) of each request in the engine;
    a running decode's Request does not count its tokens one by one). O(requests) and O(waiting) per
    tier, so the engine sends it only on request and at most every few tenths of a second.

    ahead_s[tier]: seconds until a new request of that tier (1 token of prompt) would make its first token here,
        the scheduler's own `predicted_first_token_s`: the prefill work queued ahead of it in this policy's order
        (EDF / niyama: tighter tiers first) at the observed prefill rate;
    work_tokens: prompt tokens not prefilled yet plus output tokens not made yet (up to each max_tokens), over
        every request in the engine: its outstanding work."""
    sched, kv = engine.scheduler, engine.allocator
    now = engine.now()
    ahead = {name: sched.predicted_first_token_s(now, Request(-1, now, 1, 1, tier, engine.rule)) - now
             for name, tier in engine.tiers.items()}
    work = requests = 0
    for req, num_output in live:
        requests += 1
        work += req.num_remaining_prefill + max(0, req.max_output_tokens - num_output)
    return {"time": time.time(), "prefill_tokens_per_s": sched.prefill_rate.tokens_per_s, "ahead_s": ahead,
            "work_tokens": work, "requests": requests,
            "kv_free_tokens": max(0, kv.num_free - kv.num_watermark_blocks) * kv.block_size}


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
    """The engine process's main: load the model, say "ready" (or "fatal"), then run the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the HTTP side, which shuts us down
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..engine import LLMEngine

    try:
        engine = LLMEngine(config)
        engine.set_tiers(tiers, DeadlineRule())
    except Exception as e:
        log.exception("the engine did not start")
        outputs.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    outputs.send(("ready", engine_info(engine)))
    EngineCore(engine, commands, outputs).run()
