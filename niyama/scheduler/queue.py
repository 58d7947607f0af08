"""The waiting queue: requests not decoding, ordered by a policy's key.

Policies differ mostly in how this queue sorts, so the order is
a key function handed in by the policy. Keys are fixed while a request
waits: a paused prefill leaves the queue when scheduled and comes back with
a fresh key. Three heaps, one ordering (`pop` takes the smallest head):
- started prefills (holding KV): when new admissions are blocked (memory,
  `max_num_seqs`) only these may still progress;
- not-started `low`-priority requests that are not relegated: the pool that
  priority-aware relegation sheds first (`pop_low`);
- every other not-started request.
"""

from __future__ import annotations

import heapq
from typing import Callable

from ..qos import Priority
from ..request import Request

OrderKey = Callable[[Request], float]


class WaitingQueue:
    def __init__(self, order: OrderKey):
        self.order = order
        self._started: list = []    # [(key, seq, req)] started, paused between chunks
        self._low: list = []        # not started, low priority, not relegated
        self._fresh: list = []      # not started, the rest
        self._seq = 0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._low) + len(self._started)

    @property
    def num_started(self) -> int:
        return len(self._started)

    def key(self, req: Request) -> tuple:
        # Relegated requests sort after every non-relegated one.
        return (req.relegated, self.order(req))

    def push(self, req: Request) -> None:
        self._seq += 1
        if req.started:
            heap = self._started
        elif req.priority is Priority.LOW and not req.relegated:
            heap = self._low
        else:
            heap = self._fresh
        heapq.heappush(heap, (self.key(req), self._seq, req))

    def _heads(self, started_only: bool) -> list[list]:
        heaps = (self._started,) if started_only else (self._started, self._low, self._fresh)
        return [h for h in heaps if h]

    def peek(self) -> Request | None:
        heads = self._heads(False)
        return min(h[0] for h in heads)[2] if heads else None

    def pop(self, started_only: bool = False) -> Request | None:
        heads = self._heads(started_only)
        if not heads:
            return None
        return heapq.heappop(min(heads, key=lambda h: h[0]))[2]

    def pop_low(self) -> Request | None:
        """The most urgent waiting low-priority request that is not relegated, if any."""
        return heapq.heappop(self._low)[2] if self._low else None

    def remove(self, req: Request) -> bool:
        """Take `req` out wherever it waits (an aborted request); False if it is not queued. O(n): rare."""
        for heap in (self._started, self._low, self._fresh):
            for k, entry in enumerate(heap):
                if entry[2] is req:
                    heap[k] = heap[-1]
                    heap.pop()
                    heapq.heapify(heap)
                    return True
        return False

    def __iter__(self):
        """Requests in no particular order."""
        for _, _, req in self._fresh + self._low + self._started:
            yield req
