"""Routers: which replica of a pool gets a request, decided at its arrival. One set of rules for the simulated
fleet (`cluster/sim.py`) and for Ray Serve (`server/ray_serve.NiyamaRouter`, `niyama serve --replicas N`).

A rule sees each replica as a `View`: a load report (`messages.LoadReport`) plus what this router sent the
replica since that report (`Sent`), which the report cannot count yet; and the request as a `messages.Route`.
Ray Serve's router builds views from each replica's last report (made every few tenths of a second); the
simulated fleet builds them from its replica objects each time it routes, where every send is counted at
once (no `Sent`) and the request's own tier's `ahead_s` is the scheduler's exact prediction for it. Every rule
ranks all replicas, best first (Ray Serve tries them in that order and skips one whose queue is full; the
simulator takes the first), or returns None to hold the request and be asked again `retry_s` later.

- `round-robin` (the paper's): replica k, k+1, ... in turn; looks at nothing.
- `least-loaded`: the least outstanding work, in tokens: prompt tokens not prefilled plus output tokens not
  made yet (up to each request's max_tokens) over the replica's requests (`LoadReport.work_tokens`), plus the
  prompt + max_tokens of what was sent since the report. Tokens rather than seconds: it is what a replica
  reports and the same sum over the same requests in the simulator (whose requests stop at max_tokens, so
  there the remaining output is exact; a server's is an upper bound); it needs no batch-time profile at the
  router, nor each replica's own estimate of its prefill rate, which lags and differs between like replicas
  (dividing by it would rank an idle replica with a stale rate as busy). Between like replicas a prefill token
  costs the same everywhere, so seconds and tokens order prefill work alike; they differ only in what a decode
  token weighs against a prefill token.
- `qos` (ours): the request's first token on a replica is predicted at
      ahead_s[tier] + (prompt tokens sent since the report + its prompt - its prefix cached there) / prefill rate
  where ahead_s is the replica's scheduler's own prediction for a new request of that tier
  (`Scheduler.predicted_first_token_s`: the prefill work queued ahead of it in that replica's priority order,
  at its observed prefill rate, from the end of its step in flight). A Q1 request is only ordered behind Q1
  work (and batch work whose TTFT_eff has all but run out); a Q2/Q3 request behind everything more urgent. Its
  slack there is its first-token deadline (TTFT, or TTFT_eff) less its age less that prediction. A replica is
  comfortable for it if that slack is at least `comfort` (0.5) x its first-token budget (the prediction cannot
  see later arrivals that will sort ahead, hence the margin) and, for an interactive request, none of the
  replica's running decodes is already past a token deadline (there the replica runs its smallest chunks: one
  more paced decode only slows its prefills further). Comfortable replicas come first, least work first
  (least-loaded's measure, so that decode-heavy replicas keep their pace); then the rest: those where its KV
  need (prompt + max_tokens) fits in the free KV first, each group by predicted first token (the least late
  first). Prefix affinity follows from the same two measures: where the request's prefix is cached its
  prefill is shorter (an earlier first token) and it adds less work (work is counted less that prefix), so a
  replica holding it wins among the comfortable ones unless it is busier by more than the prefix saves, and is
  never chosen when it is not comfortable (`prefix_affinity=False` ignores caches; only the simulated fleet
  knows each replica's cache: a Ray Serve replica's load report does not say what it holds of a prompt).
  Free KV is not a condition of comfort: it is KV free now, not when the request's prefill starts
  (decodes finish meanwhile), and requiring it raised Q1 violations in the simulator under KV pressure
  (sharegpt, 40K-token caches, 3 replicas at 9 QPS, 6 seeds: 6.60% against 5.70%).
  With no replica comfortable it thus goes where its first token comes earliest, and that replica's admission
  control relegates or rejects it as its tier says. With `hold_s` > 0 such a request is first held and asked
  about again every `retry_s` for up to `hold_s` (0 by default, and always on Ray Serve: a held request only
  loses slack, and a replica's own queue already puts it behind more urgent work). `prefer="slack"` orders
  the comfortable replicas by predicted first token instead of by work: measured worse (docs/design.md,
  "Cluster"): Q1 requests then flee a replica that has started batch prefills, batch requests fill it because
  no Q1 work is queued ahead of them there, and the other replicas drown in Q1 work.

Ties (equal work, or predicted first tokens within `tie_s` of the soonest) go to the first in a rotating
order, so that an idle fleet still spreads its requests: idle replicas take turns.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from .messages import LoadReport, Route

COMFORT = 0.5             # qos: a replica is comfortable when the request keeps this share of its budget as slack
TIE_S = 0.05              # qos: predicted first tokens this close count as equal
SENT_COVERED_S = 0.2      # a report this much newer than a send counts that request in
NO_REPORT = LoadReport(0.0, 1.0, {}, 0, 0, None)      # a replica not heard from yet (kv None: fits anything)


def as_report(load: LoadReport | dict | None) -> LoadReport:
    """A replica's load report as the rules read it, from a `LoadReport` or its dict form (Ray Serve's routing
    stats are dicts; an engine may send one), or `NO_REPORT` before the first."""
    if not isinstance(load, LoadReport):
        if not load or "ahead_s" not in load:
            return NO_REPORT
        load = LoadReport(**{f: load[f] for f in LoadReport._fields if f in load})
    return load._replace(prefill_tokens_per_s=max(load.prefill_tokens_per_s, 1e-6))


class Sent(NamedTuple):
    """Requests a router sent a replica that the replica's last report does not count yet."""
    routes: tuple = ()        # (Route, ...)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.routes)

    @property
    def work_tokens(self) -> int:
        return sum(r.work_tokens for r in self.routes)


def counted(route: Route, load: LoadReport) -> bool:
    """Does this load report count `route` already (made well after it was sent)?"""
    return route.sent_at + SENT_COVERED_S <= load.time


class View(NamedTuple):
    """One replica as a rule sees it: `load` is a LoadReport, or an object with its fields (the simulator's
    `cluster.sim.NodeLoad`, which computes a field when a rule first reads it)."""
    load: LoadReport
    sent: Sent = Sent()
    affinity: bool = True     # count the request's prefix cached here (a router with prefix_affinity=False: no)

    @classmethod
    def of(cls, load: LoadReport | dict | None, sent=()) -> "View":
        """From a replica's last report in any of `as_report`'s forms and the routes sent it since."""
        return cls(as_report(load), Sent(tuple(sent)))

    @property
    def work_tokens(self) -> int:
        return self.load.work_tokens + self.sent.work_tokens

    @property
    def cached_tokens(self) -> int:
        """Tokens of the request being routed that this replica's prefix cache holds (the simulator's view
        knows; a load report does not: 0)."""
        return getattr(self.load, "cached_tokens", 0) if self.affinity else 0

    @property
    def work_with(self) -> int:
        """Its work less the request's cached prefix here: what placing the request here saves ranks it."""
        return self.work_tokens - self.cached_tokens

    def first_token_s(self, route: Route) -> float:
        """Seconds from now until `route`'s first token here: the work ahead of it, then its prompt less what
        this replica has cached of it. A tier the replica did not report (explicit targets) waits for the most
        work any tier waits for here."""
        ahead_s = self.load.ahead_s
        ahead = ahead_s[route.tier] if route.tier in ahead_s else max(ahead_s.values(), default=0.0)
        own = route.prompt_tokens - self.cached_tokens
        return ahead + (self.sent.prompt_tokens + own) / self.load.prefill_tokens_per_s

    def fits(self, route: Route) -> bool:
        free = self.load.kv_free_tokens
        return free is None or free - self.sent.work_tokens >= route.work_tokens


class Router:
    name = "base"
    retry_s = 0.0          # a held request is asked about again this much later

    def __init__(self):
        self.turn = 0

    def rank(self, views: Sequence[View], route: Route | None) -> list[int] | None:
        """Indices of `views`, best first, for `route` (None: a call that is not a generation, e.g. the model's
        info: in turn); or None to hold the request."""
        order = self._order(len(views), route is not None)
        return order if route is None else self._rank(views, route, order)

    def choose(self, views: Sequence[View], route: Route) -> int | None:
        """`rank(views, route)[0]` (None: hold), reading no more of the views than it needs (the simulator)."""
        ranked = self._rank(views, route, self._order(len(views), True))
        return None if ranked is None else ranked[0]

    def _order(self, n: int, advance: bool) -> list[int]:
        """0..n-1 from whose turn it is: ties go in turn."""
        k = self.turn % n if n else 0
        if advance:
            self.turn = k + 1
        return [(k + j) % n for j in range(n)]

    def _rank(self, views: Sequence[View], route: Route, order: list[int]) -> list[int] | None:
        raise NotImplementedError


class RoundRobin(Router):
    name = "round-robin"

    def _rank(self, views, route, order):
        return order


class LeastLoaded(Router):
    name = "least-loaded"

    def _rank(self, views, route, order):
        return by_work(views, order)


class QoS(Router):
    name = "qos"
    PREFER = ("load", "slack")

    def __init__(self, *, comfort: float = COMFORT, prefer: str = "load", hold_s: float = 0.0, retry_s: float = 0.1,
                 tie_s: float = TIE_S, prefix_affinity: bool = True):
        super().__init__()
        self.prefix_affinity = prefix_affinity
        if not 0 <= comfort < 1 or hold_s < 0 or retry_s <= 0 or tie_s < 0:
            raise ValueError("comfort must be in [0, 1), hold_s >= 0, retry_s > 0, tie_s >= 0")
        if prefer not in self.PREFER:
            raise ValueError(f"prefer must be one of {self.PREFER}")
        self.comfort, self.prefer, self.hold_s, self.retry_s, self.tie_s = comfort, prefer, hold_s, retry_s, tie_s

    def comfortable(self, view: View, route: Route, first_s: float) -> bool:
        """Whether `view`'s replica is comfortable for `route`, its first token `first_s` from now there."""
        if route.interactive and view.load.decodes_late:
            return False
        return route.first_token_s - route.age_s - first_s >= self.comfort * route.first_token_s

    def choose(self, views, route):
        if not self.prefix_affinity:
            views = [v._replace(affinity=False) for v in views]
        order = self._order(len(views), True)
        if self.prefer == "load":        # the least loaded comfortable replica: try them by work
            for k in by_work(views, order):
                if self.comfortable(views[k], route, views[k].first_token_s(route)):
                    return k
        ranked = self._rank(views, route, order)
        return None if ranked is None else ranked[0]

    def _rank(self, views, route, order):
        if not self.prefix_affinity:
            views = [v._replace(affinity=False) for v in views]
        first = {k: views[k].first_token_s(route) for k in order}
        good = {k for k in order if self.comfortable(views[k], route, first[k])}
        ok = [k for k in order if k in good]
        rest = [k for k in order if k not in good]
        if not ok and route.age_s + self.retry_s <= self.hold_s:
            return None
        if self.prefer == "load":
            ok = by_work(views, ok)
        else:
            ok = self._soonest_first(views, ok, first)
        fits = {k: views[k].fits(route) for k in rest}
        return ok + sorted(self._soonest_first(views, rest, first), key=lambda k: not fits[k])

    def _soonest_first(self, views, ks: list[int], first: dict) -> list[int]:
        """`ks` by predicted first token; those within tie_s of the soonest count as the soonest, least work first."""
        best = min((first[k] for k in ks), default=0.0)
        return sorted(ks, key=lambda k: (max(first[k], best + self.tie_s), views[k].work_tokens))


def by_work(views: Sequence[View], ks: list[int]) -> list[int]:
    """`ks`, least work first, the request's cached prefix there taken off (prefix affinity: where it is cached
    it adds less work); stable: equal work keeps the turn order."""
    return sorted(ks, key=lambda k: views[k].work_with)


# name -> class; each takes its options as keywords
ROUTERS = {"round-robin": RoundRobin, "least-loaded": LeastLoaded, "qos": QoS}


def make_router(name: str, **options) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](**options)
