"""Which engine replica gets a request: the rules of `niyama serve --replicas N --router NAME`, as plain
functions over each replica's last load report (no Ray here; `ray_serve.NiyamaRouter` feeds them).

Each replica's engine reports its load (`engine_core.load_report`); a router also counts what it sent each
replica since that report (`Sent`), which the report cannot show yet. Every rule returns all replicas, best
first; Ray Serve tries them in that order and skips one whose queue is full.

- round-robin: the next replica in turn (replica ids sorted), whatever its load.
- least-loaded: the least outstanding work: prompt tokens not prefilled plus output tokens not made yet (up to
  each request's max_tokens), reported, plus the work sent since the report (prompt + max_tokens).
- qos: the request's first token on replica r is predicted at
      ahead_s[r][tier] + (prompt + prompt tokens sent to r since its report) / prefill rate of r
  where ahead_s is r's scheduler's own prediction for a new request of this tier: the prefill work queued
  ahead of it in r's policy order (under EDF / niyama a Q1 request waits only for tighter work, not for the
  batch work queued there). Its slack on r is its first-token deadline (TTFT, or TTLT less the predicted
  output time) less its age less that prediction. Replicas where its KV need fits and its slack is at least
  `comfort` x its deadline come first, least outstanding work first (so that decode-heavy replicas keep
  their pace); then the rest by predicted first token, those where its KV need fits first. With no replica
  comfortable it goes where its first token comes earliest, and that replica's admission control relegates
  or rejects it as its tier says.
Ties (within `TIE_S` of a prediction, or equal work) go in turn, so an idle fleet still spreads requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTERS = ("round-robin", "least-loaded", "qos")
TIE_S = 0.05              # predicted first tokens this close count as equal
COMFORT = 0.5             # qos: a replica is comfortable when the request keeps this share of its deadline as slack
SENT_COVERED_S = 0.2      # a report this much newer than a send counts that request in


@dataclass(frozen=True)
class Route:
    """What a router knows of one request (sent beside it to the replica)."""
    tier: str                 # the tier's name ("custom" for explicit targets)
    prompt_tokens: int
    max_tokens: int
    first_token_s: float      # its first-token deadline, seconds after arrival
    sent_at: float            # time.time() when the ingress sent it
    age_s: float = 0.0        # seconds since it reached the ingress

    @property
    def work_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass
class Load:
    """One replica's last load report (`engine_core.load_report`), as a router reads it."""
    time: float = 0.0                      # time.time() on the replica when it was made
    prefill_tokens_per_s: float = 1.0
    ahead_s: dict = field(default_factory=dict)
    work_tokens: int = 0
    requests: int = 0
    kv_free_tokens: int | None = None      # None: unknown (fits anything)

    @classmethod
    def from_stats(cls, stats: dict | None) -> "Load":
        if not stats or "ahead_s" not in stats:
            return cls()
        return cls(stats["time"], max(stats["prefill_tokens_per_s"], 1e-6), stats["ahead_s"], stats["work_tokens"],
                   stats["requests"], stats["kv_free_tokens"])


@dataclass
class Sent:
    """Requests one router sent a replica that the replica's last report does not count yet."""
    routes: list = field(default_factory=list)      # [Route]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.routes)

    @property
    def work_tokens(self) -> int:
        return sum(r.work_tokens for r in self.routes)


def counted(route: Route, load: Load) -> bool:
    """Does this load report count `route` already (made well after it was sent)?"""
    return route.sent_at + SENT_COVERED_S <= load.time


def rank(router: str, replicas: list[str], loads: dict[str, Load], sent: dict[str, Sent], route: Route | None,
         turn: int) -> list[str]:
    """`replicas` best first for `route` (None: a call that is not a generation, e.g. the model's info)."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose from {', '.join(ROUTERS)}")
    order = sorted(replicas)
    if not order:
        return []
    k = turn % len(order)
    order = order[k:] + order[:k]          # whose turn it is first: ties go in turn
    if router == "round-robin" or route is None:
        return order
    none = Sent()

    def work(r: str) -> int:
        return loads[r].work_tokens + sent.get(r, none).work_tokens

    if router == "least-loaded":
        return sorted(order, key=work)       # stable: equal work keeps the turn order
    predicted = {r: predicted_first_token_s(loads[r], sent.get(r, none), route) for r in order}
    fits = {r: loads[r].kv_free_tokens is None
            or loads[r].kv_free_tokens - sent.get(r, none).work_tokens >= route.work_tokens for r in order}
    window = route.first_token_s - route.age_s
    comfortable = [r for r in order if fits[r] and window - predicted[r] >= COMFORT * route.first_token_s]
    rest = [r for r in order if r not in comfortable]
    best = min((predicted[r] for r in rest), default=0.0)

    def soonest(r: str) -> float:          # within TIE_S of the soonest counts as the soonest
        return best if predicted[r] < best + TIE_S else predicted[r]

    return sorted(comfortable, key=work) + sorted(rest, key=lambda r: (not fits[r], soonest(r), work(r)))


def predicted_first_token_s(load: Load, sent: Sent, route: Route) -> float:
    """Seconds from now until `route`'s first token on a replica with this load (the qos rule above). A tier the
    replica did not report (explicit targets) waits for the most work any tier waits for there."""
    ahead = load.ahead_s.get(route.tier, max(load.ahead_s.values(), default=0.0))
    return ahead + (sent.prompt_tokens + route.prompt_tokens) / load.prefill_tokens_per_s
