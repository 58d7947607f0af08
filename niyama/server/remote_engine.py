"""The ingress side of `niyama serve --replicas N`: an engine client whose engine is N replicas behind a Ray
Serve deployment handle, so that `app.build_app` serves them unchanged.

`submit` sends the parsed request (prompt ids, sampling, tier) and its `Route` to the engine deployment; Ray
Serve's request router (`ray_serve.NiyamaRouter`) picks the replica, and the replica streams back batches of
`Event`s, which a relay task puts on the request's `Stream` as `EngineClient`'s reader does. `abort` cancels
the relay, and Ray Serve carries the cancellation to the replica, which aborts the request there (its KV
blocks return). A replica that dies mid-request ends its streams with a 503 error event.

What `/health` and `/metrics` show comes from the replicas' reports on the board (`ray_serve.ReplicaBoard`),
read every `poll_s`: KV blocks summed over live replicas, and each replica's Prometheus series with a
`replica` label (`merge_metrics`). `/health` is "degraded", naming them, while fewer replicas report than were
deployed (a replica silent `stale_s` is missing; one whose engine died stops reporting) or a replica's engine is
degraded, and answers 503 once none has reported for `stale_s`.

Replica -> ingress, one `messages.EventBatch` per batch of news; replica -> board -> ingress, `ReplicaReport`s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from ..messages import EngineStats, ReplicaReport, Route
from ..qos import DeadlineRule
from .engine_client import EngineStopped, Event, Stream
from .protocol import Generation

log = logging.getLogger("niyama.server")


class RemoteEngine:
    def __init__(self, handle, board, info: dict, tokenizer, rule: DeadlineRule | None = None,
                 poll_s: float = 0.5, stale_s: float = 3.0, replicas: int | None = None):
        """`handle`: the engine deployment's handle; `board`: the ReplicaBoard's; `info`: one replica's
        `EngineClient.info` (the replicas serve one model alike); `replicas`: how many were deployed."""
        self.handle = handle
        self.board = board
        self.info = {**info, "mode": "ray-serve", "pid": None}
        self.tokenizer = tokenizer
        self.rule = rule or DeadlineRule()
        self.poll_s = poll_s
        self.stale_s = stale_s              # a replica silent this long is gone
        self.expected = replicas
        self.metrics = None                 # set by build_app; unused: /metrics merges the replicas' own
        self.replicas: dict[str, ReplicaReport] = {}     # replica id -> its last report
        self.stats = EngineStats(0.0, 0, 0, 0, 0, None)
        self.stopped: str | None = None
        self._closing = False
        self._silent_since: float | None = None
        self._ids = itertools.count()
        self._relays: dict[int, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None

    # --- the engine client's surface (app.build_app) -------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._poller = loop.create_task(self._poll())

    def shutdown(self, timeout: float = 10) -> None:
        """From a thread other than the loop's (the app's lifespan)."""
        self._closing = True
        self.stopped = "the server is shutting down"
        if self._loop is not None and not self._loop.is_closed():
            for task in [self._poller, *self._relays.values()]:
                if task is not None:
                    self._loop.call_soon_threadsafe(task.cancel)

    @property
    def alive(self) -> bool:
        return self.stopped is None

    def submit(self, gen: Generation, arrival: float) -> Stream:
        if self.stopped is not None:
            raise EngineStopped(self.stopped)
        stream = Stream(next(self._ids), gen, arrival, None)
        if gen.tier.rejects_infeasible:
            stream.verdict = asyncio.get_running_loop().create_future()
        route = Route(gen.tier.name, gen.tier.interactive, len(gen.prompt_ids), gen.params.max_tokens,
                      self.rule.ttft_s(gen.tier), time.time(), time.monotonic() - arrival)
        self._relays[stream.rid] = asyncio.get_running_loop().create_task(self._relay(stream, route))
        return stream

    def abort(self, stream: Stream, reason: str = "abort") -> None:
        task = self._relays.pop(stream.rid, None)
        if task is not None:
            task.cancel()

    def render_metrics(self) -> bytes:
        return merge_metrics({rid: r.metrics for rid, r in self.replicas.items()})

    # --- one request ---------------------------------------------------------
    async def _relay(self, stream: Stream, route: Route) -> None:
        response = self.handle.options(stream=True).generate.remote(stream.gen, route=route)
        try:
            async for events, relegated in response:         # EventBatch
                stream.relegated = relegated
                verdict = stream.verdict
                if verdict is not None and not verdict.done():
                    verdict.set_result(events[0] if events and events[0].error is not None else None)
                for event in events:
                    stream.queue.put_nowait(event)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:          # the replica died (or the handle failed): end the stream, not hang it
            log.warning("request %d: the engine replica failed: %s: %s", stream.rid, type(e).__name__, e)
            self._fail(stream, f"internal error: the engine replica serving this request failed "
                               f"({type(e).__name__}); retry")
        else:
            if not stream.finished and stream.queue.empty():     # a stream that ended without its last event
                self._fail(stream, "internal error: the engine replica ended this request without a result")
        finally:
            self._relays.pop(stream.rid, None)

    @staticmethod
    def _fail(stream: Stream, message: str) -> None:
        event = Event("", 0, error=message, status=503)
        if stream.verdict is not None and not stream.verdict.done():
            stream.verdict.set_result(event)
        stream.queue.put_nowait(event)

    # --- the replicas' reports -------------------------------------------------
    async def _poll(self) -> None:
        while True:
            try:
                self._take(await self.board.snapshot.remote())
            except asyncio.CancelledError:
                raise
            except Exception as e:          # the board restarting: keep the last view meanwhile
                log.warning("reading the replicas' reports failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.poll_s)

    def _take(self, snapshot: dict) -> None:
        """snapshot: replica id -> BoardEntry."""
        live = {rid: entry.report for rid, entry in snapshot.items() if entry.age_s < self.stale_s}
        self.replicas = dict(sorted(live.items()))
        degraded = health_reasons(snapshot, self.stale_s, self.expected)
        statuses = [r.status for r in live.values()]
        self.stats = EngineStats(time.monotonic(), sum(s.kv_free for s in statuses), sum(s.kv_blocks for s in statuses),
                                 sum(s.running for s in statuses), sum(s.waiting for s in statuses), None,
                                 degraded="; ".join(degraded) or None, kv_cached=sum(s.kv_cached for s in statuses))
        if self._closing:
            return
        now = time.monotonic()
        if live:
            self._silent_since, self.stopped = None, None
        elif self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since > self.stale_s:
            self.stopped = f"no engine replica has reported for {now - self._silent_since:.0f} s"

    def describe_replicas(self) -> list[dict]:
        """/replicas: each live replica's identity, KV and queue, and the load its router sees."""
        return [{"replica": rid, "pid": r.pid, "engine_pid": r.engine_pid, "node": r.node,
                 "kv_blocks_free": r.status.kv_free, "kv_blocks": r.status.kv_blocks, "running": r.status.running,
                 "waiting": r.status.waiting, "degraded": r.status.degraded,
                 "load": r.load._asdict() if r.load is not None else None} for rid, r in self.replicas.items()]


def health_reasons(snapshot: dict, stale_s: float, expected: int | None) -> list[str]:
    """Why /health is degraded (none: "ok"), from the board's snapshot (replica id -> BoardEntry): fewer live
    replicas (reported within `stale_s`) than `expected`, with the silent ones still on the board; each live
    replica's own degraded reason."""
    live = {rid: e.report for rid, e in snapshot.items() if e.age_s < stale_s}
    reasons = []
    if expected is not None and len(live) < expected or expected is None and len(live) < len(snapshot):
        reasons.append(f"{len(live)} of {expected or len(snapshot)} engine replicas reporting")
        reasons += [f"replica {rid}: no report for {e.age_s:.0f} s" for rid, e in sorted(snapshot.items())
                    if rid not in live]
    reasons += [f"replica {rid}: {r.status.degraded}" for rid, r in sorted(live.items()) if r.status.degraded]
    return reasons


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """Several replicas' Prometheus text as one exposition: every sample gains a `replica` label, and each
    metric family appears once (the text format wants a family's samples together); plus
    `niyama:replicas`, the number of replicas reporting."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    count = Metric("niyama:replicas", "Engine replicas reporting to this endpoint", "gauge")
    count.add_sample("niyama:replicas", {}, len(texts))

    class Merged:
        def collect(self):
            yield count
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)
