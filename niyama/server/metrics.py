"""Prometheus metrics: vLLM's names under a `niyama:` prefix, plus per-tier SLO counters.

Latencies are measured on the engine's clock when tokens are published to the handlers, the same
clock the scheduler's deadlines use. Written from the engine thread; prometheus_client is thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..metrics.records import is_violated
from ..scheduler import BatchPlan

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
CHUNK_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 4096, 8192)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str, tiers: "tuple[str, ...]" = ()):
        self.registry = r = CollectorRegistry()
        m = ("model_name",)
        self.model = model_name
        self.ttft = Histogram("niyama:time_to_first_token_seconds", "Time to first token", m, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("niyama:inter_token_latency_seconds", "Time between consecutive output tokens", m,
                             registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram("niyama:e2e_request_latency_seconds", "Arrival to last token", m, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("niyama:request_queue_time_seconds", "Arrival to the first scheduled chunk",
                                    m, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_len = Histogram("niyama:request_prompt_tokens", "Prompt length of finished requests", m,
                                    registry=r, buckets=TOKEN_BUCKETS)
        self.output_len = Histogram("niyama:request_generation_tokens", "Output length of finished requests", m,
                                    registry=r, buckets=TOKEN_BUCKETS)
        self.running = Gauge("niyama:num_requests_running", "Requests holding KV (prefilling or decoding)", m,
                             registry=r)
        self.waiting = Gauge("niyama:num_requests_waiting", "Requests not started yet", m, registry=r)
        self.kv_usage = Gauge("niyama:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", m,
                              registry=r)
        self.prompt_tokens = Counter("niyama:prompt_tokens", "Prompt tokens of accepted requests", m, registry=r)
        self.generation_tokens = Counter("niyama:generation_tokens", "Generated tokens", m, registry=r)
        self.success = Counter("niyama:request_success", "Finished requests by finish reason",
                               m + ("finished_reason",), registry=r)
        self.preemptions = Counter("niyama:num_preemptions", "Decodes preempted for KV space", m, registry=r)
        # niyama's own: the promise per tier and what the scheduler did to keep it
        self.tier_requests = Counter("niyama:tier_requests", "Finished requests per QoS tier (aborts excluded)",
                                     m + ("tier",), registry=r)
        self.tier_violations = Counter("niyama:tier_violations",
                                       "Finished requests that missed their tier's target (TTFT, or TTLT)",
                                       m + ("tier",), registry=r)
        self.relegations = Counter("niyama:relegations", "Requests relegated behind on-time work",
                                   m + ("tier",), registry=r)
        self.chunk_size = Histogram("niyama:chunk_size_tokens",
                                    "Token budget the scheduler chose for iterations with prefill work", m,
                                    registry=r, buckets=CHUNK_BUCKETS)
        for tier in tiers:      # every configured tier shows up from the start, at 0
            for counter in (self.tier_requests, self.tier_violations, self.relegations):
                counter.labels(model_name, tier)
        self._last_token_s: dict[int, float] = {}     # request id -> time of its latest token

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- engine thread -----------------------------------------------------
    def request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)

    def observe_step(self, plan: BatchPlan, result, end_s: float) -> None:
        """Replica hook, after each iteration."""
        if plan.prefills:
            self.chunk_size.labels(self.model).observe(plan.token_budget)
        start_s = end_s - result.duration_s
        for chunk in plan.prefills:
            req = chunk.request
            if chunk.start == 0 and req.num_preemptions == 0:
                self.queue_time.labels(self.model).observe(max(0.0, start_s - req.arrival_s))
        for req in plan.relegated:
            self.relegations.labels(self.model, req.tier.name).inc()
        if plan.preempted:
            self.preemptions.labels(self.model).inc(len(plan.preempted))

    def tokens_emitted(self, seq, num_new: int, now_s: float) -> None:
        req = seq.request
        self.generation_tokens.labels(self.model).inc(num_new)
        last = self._last_token_s.get(req.request_id)
        if last is None:
            self.ttft.labels(self.model).observe(now_s - req.arrival_s)
        else:
            self.itl.labels(self.model).observe((now_s - last) / num_new)
        self._last_token_s[req.request_id] = now_s

    def request_finished(self, seq, now_s: float) -> None:
        req = seq.request
        self._last_token_s.pop(req.request_id, None)
        reason = seq.finish_reason or "abort"
        self.success.labels(self.model, reason).inc()
        if reason == "abort":
            return
        self.e2e.labels(self.model).observe(now_s - req.arrival_s)
        self.prompt_len.labels(self.model).observe(req.num_prompt_tokens)
        self.output_len.labels(self.model).observe(len(seq.output_ids))
        self.tier_requests.labels(self.model, req.tier.name).inc()
        if is_violated(req):
            self.tier_violations.labels(self.model, req.tier.name).inc()

    def set_gauges(self, engine) -> None:
        sched, kv = engine.scheduler, engine.allocator
        started = sched.waiting.num_started
        self.running.labels(self.model).set(len(engine.replica.decodes) + started)
        self.waiting.labels(self.model).set(len(sched.waiting) - started)
        self.kv_usage.labels(self.model).set(1 - kv.num_free / kv.num_blocks)
