"""Prometheus metrics: vLLM's names under a `niyama:` prefix, plus per-tier SLO counters.

Latencies are measured in the HTTP process: from a request's arrival there to the moment its tokens
come back from the engine (both `time.monotonic()`, the clock the engine's deadlines use too). The engine
reports what only it knows (each step's duration and chunk budget, queue times, relegations, whether a
request missed its tier's target) in its per-step messages. Written from the engine client's reader
thread; prometheus_client is thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..messages import EngineStats
from ..predictor.online import KINDS
from ..qos import Tier

disable_created_metrics()     # no `*_created` series: they double the output and no dashboard reads them

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
CHUNK_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 4096, 8192)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str, tiers: "tuple[Tier, ...]" = ()):
        self.registry = r = CollectorRegistry()
        m = ("model_name",)
        self.model = model_name
        mt = m + ("tier",)        # latencies per tier, to plot each against its tier's target
        self.ttft = Histogram("niyama:time_to_first_token_seconds", "Time to first token", mt, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("niyama:inter_token_latency_seconds", "Time between consecutive output tokens", mt,
                             registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram("niyama:e2e_request_latency_seconds", "Arrival to last token", mt, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("niyama:request_queue_time_seconds", "Arrival to the first scheduled chunk",
                                    mt, registry=r, buckets=LATENCY_BUCKETS)
        self.iteration_tokens = Histogram("niyama:iteration_tokens_total", "Tokens in each engine step (prefill "
                                          "chunks + one per decode)", m, registry=r, buckets=CHUNK_BUCKETS)
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
        self.prefix_queries = Counter("niyama:prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                      "when their prefill started", mt, registry=r)
        self.prefix_hits = Counter("niyama:prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
                                   "prefill skipped)", mt, registry=r)
        self.client_disconnects = Counter("niyama:client_disconnects", "HTTP clients that left before their "
                                          "answer was complete (while sending the body, waiting or streaming)",
                                          m, registry=r)
        self.kv_cached = Gauge("niyama:kv_cache_cached_blocks", "KV blocks holding reusable prompt prefixes, held "
                               "by a request or idle (idle ones are evicted, least recently used first, when "
                               "blocks run out)", m, registry=r)
        # niyama's own: the promise per tier and what the scheduler did to keep it
        self.tier_requests = Counter("niyama:tier_requests", "Finished requests per QoS tier (aborts excluded)",
                                     m + ("tier",), registry=r)
        self.tier_violations = Counter("niyama:tier_violations",
                                       "Finished requests that missed their tier's target (TTFT, or TTLT)",
                                       m + ("tier",), registry=r)
        self.relegations = Counter("niyama:relegations", "Requests relegated behind on-time work",
                                   m + ("tier",), registry=r)
        self.rejections = Counter("niyama:rejections", "Requests refused at arrival (429) because their deadline "
                                  "was predicted infeasible, in tiers with on_infeasible = reject",
                                  m + ("tier",), registry=r)
        self.chunk_size = Histogram("niyama:chunk_size_tokens",
                                    "Token budget the scheduler chose for iterations with prefill work", m,
                                    registry=r, buckets=CHUNK_BUCKETS)
        self.step_time = Histogram("niyama:iteration_duration_seconds", "Measured duration of each engine step",
                                   m, registry=r, buckets=STEP_BUCKETS)
        self.step_ratio = Histogram("niyama:iteration_time_over_predicted", "Each engine step's measured duration "
                                    "over what the scheduler predicted for it when it planned it (the profile, "
                                    "corrected online; 1 = exact; above 1 it plans chunks too large for its "
                                    "deadlines)", m,
                                    registry=r, buckets=RATIO_BUCKETS)
        self.correction = Gauge("niyama:predictor_correction", "The online correction of the batch-time profile: "
                                "measured over profile-predicted step time, per kind of step (1 = the profile is right)",
                                m + ("kind",), registry=r)
        self.tier_target = Gauge("niyama:tier_target_seconds", "Each configured tier's targets (kind: ttft, tbt, "
                                 "ttlt), to draw beside its latencies", m + ("tier", "kind"), registry=r)
        for kind in KINDS:
            self.correction.labels(model_name, kind).set(1.0)
        for t in tiers:
            for kind in ("ttft", "tbt", "ttlt"):
                if getattr(t, f"{kind}_s") is not None:
                    self.tier_target.labels(model_name, t.name, kind).set(getattr(t, f"{kind}_s"))
        for metric in (self.step_time, self.step_ratio, self.iteration_tokens, self.chunk_size, self.prompt_len, self.output_len,
                       self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                       self.preemptions, self.kv_cached, self.client_disconnects):
            metric.labels(model_name)          # every series exists from the start (at 0), for dashboards
        for tier in (t.name for t in tiers):      # every configured tier shows up from the start, at 0
            for metric in (self.tier_requests, self.tier_violations, self.relegations, self.rejections, self.ttft,
                           self.itl, self.e2e, self.queue_time, self.prefix_queries, self.prefix_hits):
                metric.labels(model_name, tier)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def client_left(self) -> None:
        """Event loop: an HTTP client disconnected before its answer was complete."""
        self.client_disconnects.labels(self.model).inc()

    # --- the engine client's reader thread ----------------------------------
    def request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)

    def observe(self, stats: EngineStats) -> None:
        """An engine message's stats: the steps it covers and the engine's state after them."""
        m = self.model
        for step in stats.steps:
            self.step_time.labels(m).observe(step.duration_s)
            if step.predicted_s > 0:
                self.step_ratio.labels(m).observe(step.duration_s / step.predicted_s)
            if step.budget is not None:
                self.chunk_size.labels(m).observe(step.budget)
            self.iteration_tokens.labels(m).observe(step.tokens)
            for tier, q, prompt, cached in step.started:
                self.queue_time.labels(m, tier).observe(max(0.0, q))
                self.prefix_queries.labels(m, tier).inc(prompt)
                self.prefix_hits.labels(m, tier).inc(cached)
            for tier in step.relegated:
                self.relegations.labels(m, tier).inc()
            if step.preempted:
                self.preemptions.labels(m).inc(step.preempted)
        for kind, ratio in (stats.correction or {}).items():
            self.correction.labels(m, kind).set(ratio)
        self.running.labels(m).set(stats.running)
        self.waiting.labels(m).set(stats.waiting)
        self.kv_usage.labels(m).set(1 - stats.kv_free / stats.kv_blocks)
        self.kv_cached.labels(m).set(stats.kv_cached)

    def tokens_emitted(self, stream, num_new: int, now_s: float) -> None:
        self.generation_tokens.labels(self.model).inc(num_new)
        tier = stream.gen.tier.name
        if stream.last_token_time is None:
            self.ttft.labels(self.model, tier).observe(now_s - stream.arrival)
        else:
            self.itl.labels(self.model, tier).observe((now_s - stream.last_token_time) / num_new)
        stream.last_token_time = now_s

    def request_finished(self, stream, out, now_s: float) -> None:
        """The engine's last output for a request (finished, aborted, rejected, or failed)."""
        if out.error is not None and out.status == 429:
            self.rejections.labels(self.model, stream.gen.tier.name).inc()
            return
        reason = "error" if out.error is not None else out.finish_reason
        self.success.labels(self.model, reason).inc()
        if reason in ("abort", "error"):
            return
        tier = stream.gen.tier.name
        self.e2e.labels(self.model, tier).observe(now_s - stream.arrival)
        self.prompt_len.labels(self.model).observe(len(stream.gen.prompt_ids))
        self.output_len.labels(self.model).observe(len(stream.output_ids))
        self.tier_requests.labels(self.model, tier).inc()
        if out.violated:
            self.tier_violations.labels(self.model, tier).inc()
