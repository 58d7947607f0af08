"""`niyama serve --replicas N`: N engine replicas as one Ray Serve deployment behind one OpenAI endpoint.

    client --HTTP--> Ray Serve proxy --> Ingress (1 replica: app.build_app over a RemoteEngine: parse, validate,
                                         |  tokenize, answer 4xx, stream SSE)
                                         |  handle.generate(Generation, route=Route), routed by NiyamaRouter
                                         v
                     EngineReplica x N (each an EngineClient and its engine process, as in `niyama serve`;
                                        detokenizes and applies stop strings, streams EventBatches back)
                     ReplicaBoard (each replica's ReplicaReport: stats, load, Prometheus text, for /health,
                                   /metrics, /replicas)

What crosses between the ingress and the replicas is declared in `niyama.messages` (its last section).

The router reads each replica's load through Ray Serve's routing stats: the controller calls every replica's
`record_routing_stats` each `REPORT_PERIOD_S` and hands the result to the routers (`RunningReplica
.routing_stats`); the replica answers with its engine's last load report (made every `LOAD_PERIOD_S` while
it works; a dict, as Ray wants). The rules are `niyama.routing`'s, the simulated fleet's. A client that leaves
cancels the ingress's request; the relay's cancellation reaches the replica's `generate`, which aborts the
request in its engine (its KV blocks return).

Requests that give no `seed` draw one from their replica's own stream (the server's `--seed` mixed with the
replica's rank), so replicas do not repeat each other's draws.

A local Ray instance (no `--address`) is bound to 127.0.0.1: its node address is loopback, so its GCS, raylet,
agents and workers listen there, and each replica's Serve gRPC server too (`_serve_grpc_on_loopback`); only
the HTTP proxy listens where `--host` says. Ray has no authentication to speak of: whoever reaches its ports
runs code.

Imported only on this path: single-replica `niyama serve` needs no Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import os
import random
import signal
import sys
import time

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..messages import BoardEntry, EventBatch, LoadReport, ReplicaReport, ReplicaStatus, Route
from ..routing import View, as_report, counted, make_router
from .engine_client import EngineStopped, Event
from .metrics import ServerMetrics
from .remote_engine import RemoteEngine
from .start import start_engine

log = logging.getLogger("niyama.server")

APP = "niyama"
LOAD_PERIOD_S = 0.25       # the engine's load report, while it works
REPORT_PERIOD_S = 0.5      # replica -> router (routing stats) and -> board (stats, metrics)
SENT_KEEP_S = 30.0         # a router forgets a send after this long even if no report came


class NiyamaRouter(RequestRouter):
    """Ray Serve's request router for the engine deployment: a `niyama.routing` rule over the replicas' routing
    stats and the requests this router sent since them. Runs in the ingress process (the handle's owner). Its
    rule never holds a request (no hold_s)."""

    def initialize_state(self, router: str = "qos"):
        self.rule = make_router(router)
        self.sent: dict[str, tuple[str, Route]] = {}     # request id -> (replica id, its route)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ids = sorted(by_id)
        loads = {rid: as_report(by_id[rid].routing_stats) for rid in ids}
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        route = route if isinstance(route, Route) else None
        key = pending_request.metadata.internal_request_id if pending_request is not None else None
        self.sent.pop(key, None)          # chosen again (its first choice failed): counted where it goes now
        now = time.time()
        sent: dict[str, list[Route]] = {}
        for request_id, (rid, r) in list(self.sent.items()):
            if rid not in loads or counted(r, loads[rid]) or now - r.sent_at > SENT_KEEP_S:
                del self.sent[request_id]
            else:
                sent.setdefault(rid, []).append(r)
        order = [ids[k] for k in self.rule.rank([View.of(loads[rid], sent.get(rid, ())) for rid in ids], route)]
        if route is not None and order:
            self.sent[key] = (order[0], route)      # where it goes unless that replica's queue is full
        return [[by_id[rid]] for rid in order]

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self.sent.pop(internal_request_id, None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class ReplicaBoard:
    """The engine replicas' last reports (stats, load, Prometheus text), read by the ingress. A deployment of
    its own so that Serve starts, restarts and removes it with the app."""

    def __init__(self):
        _serve_grpc_on_loopback()
        self.reports: dict[str, tuple[float, ReplicaReport]] = {}

    async def report(self, replica: str, report: ReplicaReport) -> None:
        self.reports[replica] = (time.monotonic(), report)

    async def leave(self, replica: str) -> None:
        self.reports.pop(replica, None)

    async def snapshot(self) -> dict:
        """replica id -> BoardEntry; replicas silent a minute are forgotten."""
        now = time.monotonic()
        self.reports = {k: v for k, v in self.reports.items() if now - v[0] < 60}
        return {k: BoardEntry(now - t, r) for k, (t, r) in self.reports.items()}


class EngineReplica:
    """One engine: `niyama serve`'s EngineClient and engine process, fed over a Ray Serve handle."""

    async def __init__(self, config, tiers, in_process: bool, served_name: str | None, board):
        _serve_grpc_on_loopback()
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        rank = getattr(context, "rank", None)
        rank = getattr(rank, "rank", rank)
        # the seeds of requests that give none: this replica's own stream (one shared would repeat its draws)
        self.seeds = random.Random(f"niyama {getattr(config, 'seed', 0)} {self.id if rank is None else rank}")
        self.client = await asyncio.to_thread(start_engine, config, tiers, in_process)
        self.client.metrics = ServerMetrics(served_name or self.client.info["model_name"], tuple(tiers))
        self.client.start(asyncio.get_running_loop())
        self.client.report_load(LOAD_PERIOD_S)
        self.board = board
        self.node = ray.util.get_node_ip_address()
        self.reporter = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("engine replica %s ready: %s", self.id, self.client.info["describe"])

    def info(self) -> dict:
        return self.client.info

    async def generate(self, gen, route: Route):
        """Stream one request's events, in `EventBatch`es."""
        transit = max(0.0, time.time() - route.sent_at)
        if gen.params.seed is None:
            gen = dataclasses.replace(gen, params=dataclasses.replace(gen.params, seed=self.seeds.getrandbits(62)))
        try:
            stream = self.client.submit(gen, time.monotonic() - route.age_s - transit)
        except EngineStopped as e:
            yield EventBatch([Event("", 0, error=f"the server cannot take requests: {e}", status=503)], False)
            return
        try:
            if stream.verdict is not None:
                rejected = await stream.verdict
                yield EventBatch([rejected] if rejected is not None else [], False)
                if rejected is not None:
                    return
            while not stream.finished:
                events = [await stream.__anext__()]
                while not stream.finished and not stream.queue.empty():
                    events.append(await stream.__anext__())
                yield EventBatch(events, stream.relegated)
        finally:                # the ingress cancelled (its client left) or the stream ended
            if not stream.finished:
                self.client.abort(stream)

    def record_routing_stats(self) -> dict:
        """The engine's last load report, as the dict Ray Serve carries to the routers."""
        load = self.client.load
        return load._asdict() if isinstance(load, LoadReport) else load or {}

    def check_health(self) -> None:
        if not self.client.alive:           # the engine process died: Serve replaces this replica
            raise RuntimeError(self.client.stopped)

    def report(self) -> ReplicaReport:
        s = self.client.stats
        load = self.client.load
        return ReplicaReport(os.getpid(), self.client.info["pid"], self.node,
                             ReplicaStatus(s.kv_free, s.kv_blocks, s.degraded, s.running, s.waiting, s.kv_cached),
                             as_report(load) if load else None, self.client.render_metrics())

    async def _report_loop(self) -> None:
        while True:
            try:
                if self.client.alive:       # a dead engine's replica goes silent (the ingress counts it missing)
                    await self.board.report.remote(self.id, self.report())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("replica %s: reporting to the board failed: %s: %s", self.id, type(e).__name__, e)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def __del__(self):
        self.reporter.cancel()
        try:
            await asyncio.wait_for(self.board.leave.remote(self.id), 2)
        except Exception:
            pass
        await asyncio.to_thread(self.client.shutdown)


@serve.ingress()
class Ingress:
    """The HTTP side: `app.build_app` over a RemoteEngine, plus /replicas."""

    async def __init__(self, engine, board, chat_template, qos, limits, served_name: str | None, replicas: int):
        from ..engine.tokenizer import Tokenizer

        _serve_grpc_on_loopback()
        info = await engine.info.remote()
        tokenizer = None
        if info["tokenizer_path"]:
            tokenizer = await asyncio.to_thread(Tokenizer, info["tokenizer_path"], info["eos_token_ids"],
                                                chat_template)
        self.runner = RemoteEngine(engine, board, info, tokenizer, replicas=replicas)
        self.name = served_name or info["model_name"]
        self.qos = qos
        self.limits = limits

    def __serve_build_asgi_app__(self):
        from .app import build_app

        app = build_app(self.runner, self.name, self.qos, self.limits)
        runner = self.runner

        @app.get("/replicas")
        async def replicas():
            """Each live engine replica: pid, node, KV blocks, queue and the load its router sees."""
            return {"object": "list", "data": runner.describe_replicas()}

        return app


def build(config, tiers, qos, limits, *, replicas: int, router: str, served_name: str | None, in_process: bool,
          replica_cpus: float, replica_gpus: float):
    """The Serve application: ingress, engine deployment (its router, health checks) and board."""
    board = ReplicaBoard.bind()
    engine = serve.deployment(EngineReplica).options(
        name="EngineReplica", num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=limits.max_queued,       # the ingress bounds what is in flight (429 beyond)
        health_check_period_s=1.0, health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5.0,
        max_constructor_retry_count=3,
        request_router_config=RequestRouterConfig(
            request_router_class=NiyamaRouter, request_router_kwargs={"router": router},
            request_routing_stats_period_s=REPORT_PERIOD_S, request_routing_stats_timeout_s=5.0),
    ).bind(config, tiers, in_process, served_name, board)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=limits.max_queued + 64)
    return ingress.bind(engine, board, config.chat_template, qos, limits, served_name, replicas)


def run(args, config, tiers, qos, limits) -> int:
    """`niyama serve --replicas N`: start (or join) Ray, deploy, serve until SIGINT / SIGTERM, then remove the app
    (and the local Ray instance it started)."""
    local = args.address is None
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1 if (config.device or ("cuda" if _local_cuda() else "cpu")).startswith("cuda") else 0
    started = time.monotonic()
    if local:       # a local instance's CPU count is bookkeeping: let N replicas fit whatever the core count
        _loopback_node()
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(args.replicas * args.replica_cpus)),
                 include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=args.address, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port},
                logging_config={"enable_access_log": args.log_level == "debug", "log_level": "WARNING"})
    app = build(config, tiers, qos, limits, replicas=args.replicas, router=args.router,
                served_name=args.served_model_name, in_process=args.in_process_engine,
                replica_cpus=args.replica_cpus, replica_gpus=gpus)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))     # a clean exit through the finally below
    try:
        serve.run(app, name=APP, route_prefix="/", blocking=False,
                  logging_config={"enable_access_log": args.log_level == "debug", "log_level": "WARNING"})
        where = "a local Ray instance" if local else f"the Ray cluster at {args.address}"
        print(f"serving {args.replicas} engine replica(s) ({args.replica_cpus:g} CPU, {gpus:g} GPU each; router "
              f"{args.router}) on {where} after {time.monotonic() - started:.1f} s; "
              f"http://{args.host}:{args.port}/v1 (/replicas lists them)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        try:
            if not local:
                serve.delete(APP)       # the cluster's Serve and its other apps stay
        finally:
            ray.shutdown()              # a local instance goes whole (its engine processes exit with their replicas)
    return 0


def _loopback_node() -> None:
    """Make the local Ray instance's node address 127.0.0.1, so that its processes listen there rather than on
    every interface. Ray (2.60) swaps a loopback `_node_ip_address` for the host's routable address unless
    clusters are off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read at import: set for the processes Ray starts,
    and in this one's constants)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _serve_grpc_on_loopback() -> None:
    """In a Serve replica's process, before Serve starts the replica's inter-deployment gRPC server (after the
    constructor): Ray Serve (2.60) binds it to [::]:0 whatever the node's address; on a loopback node (a local
    instance) bind it to 127.0.0.1 instead. Nothing changes on a cluster's nodes or if Ray's internals moved."""
    try:
        if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
            return
        from ray.serve._private import replica
    except Exception:
        return
    add = getattr(replica, "add_port_to_grpc_server", None)
    if add is None or getattr(add, "niyama_loopback", False):
        return

    def add_on_loopback(server, address, *args, **kwargs):
        if isinstance(address, str) and address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return add(server, address, *args, **kwargs)

    add_on_loopback.niyama_loopback = True
    replica.add_port_to_grpc_server = add_on_loopback


def _local_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
