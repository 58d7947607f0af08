"""Eager relegation and admission: the rate estimates they rely on."""

from __future__ import annotations

import math
from bisect import bisect_left

from ..request import Request


class PrefillRate:
    """Exponential moving average of observed prefill tokens per second."""

    def __init__(self, initial: float = 8500.0, decay: float = 0.995):
        if initial <= 0 or not 0 <= decay < 1:
            raise ValueError("prefill rate must be > 0 and decay in [0, 1)")
        self.tokens_per_s = initial
        self.decay = decay

    def observe(self, num_prefill_tokens: int, duration_s: float) -> None:
        if num_prefill_tokens > 0 and duration_s > 0:
            self.tokens_per_s = self.decay * self.tokens_per_s + (1 - self.decay) * num_prefill_tokens / duration_s


class ThroughputWhileWaiting:
    """Prefill tokens per second of wall time while prefill work waits: admission control's rate. Steps that
    run no prefill although work waits (decode-only steps between chunks, when the decodes' slack leaves no
    budget or no slot is free) count their time too, which a per-step rate (PrefillRate) leaves out: on an
    overloaded replica that is where a waiting request's time goes. A ratio of two moving averages (tokens,
    seconds), started from `initial` tokens/s as if `prior_s` seconds had been seen."""

    def __init__(self, initial: float, decay: float = 0.995, prior_s: float = 0.05):
        if initial <= 0 or not 0 <= decay < 1 or prior_s <= 0:
            raise ValueError("the rate must be > 0, the decay in [0, 1) and the prior > 0 s")
        self.decay = decay
        self.tokens = initial * prior_s
        self.seconds = prior_s

    def observe(self, num_prefill_tokens: int, duration_s: float) -> None:
        if duration_s > 0:
            d = self.decay
            self.tokens = d * self.tokens + (1 - d) * num_prefill_tokens
            self.seconds = d * self.seconds + (1 - d) * duration_s

    @property
    def tokens_per_s(self) -> float:
        return max(self.tokens, 1e-9) / self.seconds


def too_late(now: float, req: Request, rate: PrefillRate) -> bool:
    """Would `req`'s prefill, started now at the observed rate, miss its first-token deadline?"""
    return now + req.num_remaining_prefill / rate.tokens_per_s > req.first_token_deadline_s


class ArrivalWork:
    """Prefill tokens that arrived in each tier over the last `history_s`: how fast a tier's new work comes,
    averaged over as long a past as the future one asks about (admission control: how much work of a
    tighter tier will sort ahead of a request while it waits). A window never shorter than `min_window_s`,
    so that a lone early arrival does not read as a flood."""

    def __init__(self, history_s: float = 3600.0, min_window_s: float = 60.0):
        if not history_s >= min_window_s > 0:
            raise ValueError("the arrival history must be >= its shortest window > 0 s")
        self.history_s = history_s
        self.min_window_s = min_window_s
        self._lanes: dict[str, _Lane] = {}

    def observe(self, req: Request) -> None:
        lane = self._lanes.get(req.tier.name)
        if lane is None:
            lane = self._lanes[req.tier.name] = _Lane(req.arrival_s)
        lane.add(req.arrival_s, req.num_remaining_prefill, req.ttft_s, self.history_s)

    def rates(self, now: float, horizon_s: float) -> list[tuple[float, float]]:
        """(TTFT_eff, tokens/s over the last `horizon_s`) of each tier seen."""
        window = min(max(horizon_s, self.min_window_s), self.history_s)
        return [(lane.ttft_s, lane.tokens_since(now - window) / max(min(window, now - lane.first_s),
                                                                     self.min_window_s))
                for lane in self._lanes.values()]


class _Lane:
    """One tier's arrivals: times and running token totals, oldest dropped past the history."""

    def __init__(self, first_s: float):
        self.first_s = first_s
        self.times: list[float] = []
        self.totals: list[int] = []     # tokens up to and including each arrival
        self.dropped = 0                # the running total before times[0]
        self.ttft_s = 0.0

    def add(self, t: float, tokens: int, ttft_s: float, history_s: float) -> None:
        t = max(t, self.times[-1]) if self.times else t      # server arrivals may come a hair out of order
        self.times.append(t)
        self.totals.append((self.totals[-1] if self.totals else self.dropped) + tokens)
        self.ttft_s = ttft_s
        old = bisect_left(self.times, t - history_s)
        if old > len(self.times) // 2:                       # drop in bulk: amortised O(1) per arrival
            self.dropped = self.totals[old - 1]
            del self.times[:old], self.totals[:old]

    def tokens_since(self, t: float) -> int:
        i = bisect_left(self.times, t)
        if not self.totals:
            return 0
        return self.totals[-1] - (self.totals[i - 1] if i > 0 else self.dropped)


def wait_with_arrivals(work_s: float, lanes: list[tuple[float, float]]) -> float:
    """Seconds x until a request is served when `work_s` seconds of prefill are ahead of it now and each lane
    (cap_s, share) adds `share` seconds of work per second (its arrivals sort ahead) until `cap_s`: the least
    x with x = work_s + sum(share * min(x, cap_s)), inf if there is none."""
    lanes = sorted((cap, share) for cap, share in lanes if cap > 0 and share > 0)
    active = sum(share for _, share in lanes)
    base = work_s
    for cap, share in lanes:
        if active < 1:
            x = base / (1 - active)
            if x <= cap:
                return x
        base += share * cap          # past `cap` this lane adds nothing more
        active -= share
    return base / (1 - active) if active < 1 else math.inf
