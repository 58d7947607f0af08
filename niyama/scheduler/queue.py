"""The waiting queue: requests not decoding, ordered by a policy's key.

Policies differ mostly in how this queue sorts (SPEC §6), so the order is
a key function handed in by the policy. Keys are fixed while a request
waits: a paused prefill leaves the queue when scheduled and comes back with
a fresh key. Started prefills (holding KV) sit in their own heap so that
when new admissions are blocked (memory, `max_num_seqs`) they can still
progress; `pop` takes the smaller head of the two heaps.
"""

from __future__ import annotations

import heapq
from typing import Callable

from ..request import Request

OrderKey = Callable[[Request], float]


class WaitingQueue:
    def __init__(self, order: OrderKey):
        self.order = order
        self._fresh: list = []      # [(key, seq, req)] not started
        self._started: list = []    # [(key, seq, req)] started, paused between chunks
        self._seq = 0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._started)

    @property
    def num_started(self) -> int:
        return len(self._started)

    def key(self, req: Request) -> tuple:
        # Relegated requests sort after every non-relegated one (SPEC §3.5).
        return (req.relegated, self.order(req))

    def push(self, req: Request) -> None:
        self._seq += 1
        heapq.heappush(self._started if req.started else self._fresh, (self.key(req), self._seq, req))

    def peek(self) -> Request | None:
        heads = [h[0] for h in (self._fresh, self._started) if h]
        return min(heads)[2] if heads else None

    def pop(self, started_only: bool = False) -> Request | None:
        fresh, started = self._fresh, self._started
        if started and (started_only or not fresh or started[0] < fresh[0]):
            return heapq.heappop(started)[2]
        if fresh and not started_only:
            return heapq.heappop(fresh)[2]
        return None

    def __iter__(self):
        """Requests in no particular order."""
        for _, _, req in self._fresh + self._started:
            yield req
