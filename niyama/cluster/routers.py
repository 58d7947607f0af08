"""Routers: which replica of a pool gets a request, decided at its arrival.

A router sees each replica of its pool as the cluster simulation leaves it
at that moment (`sim.py`: every step that started before the arrival has
run) and returns the index of one, or None to hold the request and be asked
again `retry_s` later.

- `round-robin` (the paper's): replica k, k+1, ... in turn; looks at nothing.
- `least-loaded`: the least outstanding predicted work, in seconds: the
  replica's queued prefill tokens at the profile's full-chunk rate (the
  time of a 2552-token prefill step / 2552) plus its running decodes, each
  with `decode_tokens` tokens still to come (the tier rule's predicted
  output length), at the per-token cost of a 128-decode step. Ties go to
  the first in a rotating order, so idle replicas take turns.
- `qos` (ours): for each replica, the scheduler's own prediction of the
  request's first token there (`Scheduler.predicted_first_token_s`: the
  prefill work queued ahead of it in that replica's priority order, at that
  replica's observed prefill rate, from the end of its step in flight), so
  slack = first-token deadline - predicted first token. A Q1 request is
  only ordered behind Q1 work (and batch work whose TTFT_eff has all but
  run out); a Q2/Q3 request behind everything more urgent. A replica is
  comfortable for the request if that slack is at least `comfort` (0.5, as
  in the server's router, `niyama/server/routing.py`) x the request's
  first-token budget (TTFT, or TTFT_eff; the prediction cannot see later
  arrivals that will sort ahead, hence the margin) and, for an
  interactive request, none of its running decodes is already past a token
  deadline (there the replica runs its smallest chunks: one more paced
  decode only slows its prefills further). Rule: the least loaded
  comfortable replica (least-loaded's measure; ties in turn); if none is
  comfortable, the one with the most slack (the least late). With `hold_s`
  > 0 a request no replica is comfortable for is first held and asked about
  again every `retry_s` for up to `hold_s` (0 by default: a held request
  only loses slack, and a replica's own queue already puts it behind more
  urgent work). `prefer="slack"` picks the comfortable replica with the
  most slack instead of the least loaded: measured worse (docs/design.md,
  "Cluster"): Q1 requests then flee a replica that has started batch
  prefills, batch requests fill it because no Q1 work is queued ahead of
  them there, and the other replicas drown in Q1 work.
"""

from __future__ import annotations

from typing import Sequence

from ..predictor import BatchTimePredictor
from ..request import Request

FULL_CHUNK = 2552          # niyama's largest candidate: the profile's saturated prefill step
DECODE_BATCH = 128         # a decode's per-token cost is taken in a step of this many decodes...
DECODE_CONTEXT = 2048      # ...of this context each


class Router:
    name = "base"
    retry_s = 0.0          # a held request is asked about again this much later

    def route(self, now: float, req: Request, nodes: Sequence) -> int | None:
        """Index in `nodes` of the replica that gets `req`, or None to hold it."""
        raise NotImplementedError


class RoundRobin(Router):
    name = "round-robin"

    def __init__(self, predictor: BatchTimePredictor | None = None, decode_tokens: int = 15):
        self._next = 0

    def route(self, now: float, req: Request, nodes: Sequence) -> int:
        k = self._next % len(nodes)
        self._next = k + 1
        return k


class WorkEstimate:
    """Outstanding work of a replica in seconds, from the profile (see least-loaded above)."""

    def __init__(self, predictor: BatchTimePredictor, decode_tokens: int):
        self.prefill_s_per_token = predictor.batch_time(FULL_CHUNK, 0, 0, 0) / FULL_CHUNK
        self.decode_s = decode_tokens * predictor.batch_time(0, DECODE_BATCH, DECODE_BATCH * DECODE_CONTEXT,
                                                             0) / DECODE_BATCH

    def seconds(self, node) -> float:
        return node.queued_prefill_tokens * self.prefill_s_per_token + len(node.replica.decodes) * self.decode_s


class LeastLoaded(Router):
    name = "least-loaded"

    def __init__(self, predictor: BatchTimePredictor, decode_tokens: int = 15):
        self.work = WorkEstimate(predictor, decode_tokens)
        self._start = 0

    def route(self, now: float, req: Request, nodes: Sequence) -> int:
        n = len(nodes)
        order = [(self._start + j) % n for j in range(n)]
        self._start = (self._start + 1) % n
        return min(order, key=lambda k: self.work.seconds(nodes[k]))


class QoSRouter(Router):
    name = "qos"
    PREFER = ("load", "slack")

    def __init__(self, predictor: BatchTimePredictor, decode_tokens: int = 15, *, comfort: float = 0.5,
                 prefer: str = "load", hold_s: float = 0.0, retry_s: float = 0.1):
        if not 0 <= comfort < 1 or hold_s < 0 or retry_s <= 0:
            raise ValueError("comfort must be in [0, 1), hold_s >= 0, retry_s > 0")
        if prefer not in self.PREFER:
            raise ValueError(f"prefer must be one of {self.PREFER}")
        self.work = WorkEstimate(predictor, decode_tokens)
        self.comfort = comfort
        self.prefer = prefer
        self.hold_s = hold_s
        self.retry_s = retry_s
        self._start = 0

    def slack(self, now: float, req: Request, node) -> tuple[float, bool]:
        """(first-token deadline - predicted first token on `node`, whether `node` is comfortable for `req`)."""
        replica = node.replica
        at = max(now, replica.clock.now())          # a replica mid-step starts on it at the step's end
        deadline = req.first_token_deadline_s
        slack = deadline - replica.scheduler.predicted_first_token_s(at, req)
        ok = slack >= self.comfort * (deadline - req.arrival_s) and self._decodes_on_time(at, req, replica)
        return slack, ok

    @staticmethod
    def _decodes_on_time(at: float, req: Request, replica) -> bool:
        """An interactive request avoids a replica with a decode already past its token deadline."""
        decodes = replica.decodes
        return not (req.tier.interactive and decodes and decodes.min_deadline(replica.iteration) < at)

    def _comfortable(self, now: float, req: Request, node, latest: float) -> bool:
        """Whether `node` is comfortable for `req` (first token by `latest`): first as if every token queued
        there were ahead of it, which needs no walk of the queue; if not, the scheduler's exact prediction."""
        replica = node.replica
        at = max(now, replica.clock.now())
        ahead = node.queued_prefill_tokens + req.num_remaining_prefill
        if at + ahead / replica.scheduler.prefill_rate.tokens_per_s <= latest:
            return self._decodes_on_time(at, req, replica)
        return self.slack(now, req, node)[1]

    def route(self, now: float, req: Request, nodes: Sequence) -> int | None:
        n = len(nodes)
        order = [(self._start + j) % n for j in range(n)]
        self._start = (self._start + 1) % n
        if self.prefer == "load":                     # the least loaded comfortable one: try them by load
            deadline = req.first_token_deadline_s
            latest = deadline - self.comfort * (deadline - req.arrival_s)
            seconds = self.work.seconds
            for _, _, k in sorted((seconds(nodes[k]), j, k) for j, k in enumerate(order)):
                if self._comfortable(now, req, nodes[k], latest):
                    return k
        scored = [(k, *self.slack(now, req, nodes[k])) for k in order]
        comfortable = [(k, s) for k, s, ok in scored if ok]
        if comfortable:                               # prefer == "slack"
            return max(comfortable, key=lambda x: x[1])[0]
        if now - req.arrival_s + self.retry_s <= self.hold_s:
            return None
        return max(scored, key=lambda x: x[1])[0]


# name -> class; each takes (predictor, decode_tokens, **options)
ROUTERS = {"round-robin": RoundRobin, "least-loaded": LeastLoaded, "qos": QoSRouter}


def make_router(name: str, predictor: BatchTimePredictor, decode_tokens: int = 15, **options) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](predictor, decode_tokens, **options)
