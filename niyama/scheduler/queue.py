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
For admission control the queue can also keep a `WorkLedger`: the waiting
requests' prefill work sorted by key, so that "how much work is queued
before this key" costs a bisect and a C-speed sum, not a walk of the heaps.
It is kept only once someone asks (`track_work`): no cost otherwise.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from typing import Callable

from ..qos import Priority
from ..request import Request

OrderKey = Callable[[Request], float]


class WorkLedger:
    """Prefill work of not-started waiting requests, sorted by their (key, seq) queue entries."""

    def __init__(self):
        self._entries: list[tuple] = []     # (key, seq), sorted
        self._work: list[int] = []          # remaining prefill, in the same order

    def add(self, entry: tuple, work: int) -> None:
        i = bisect_left(self._entries, entry)
        self._entries.insert(i, entry)
        self._work.insert(i, work)

    def remove(self, entry: tuple) -> None:
        i = bisect_left(self._entries, entry)
        del self._entries[i], self._work[i]

    def between(self, lo: tuple | None, hi: tuple) -> int:
        """Work of the entries whose key is in [lo, hi) (from the first if `lo` is None)."""
        start = 0 if lo is None else bisect_left(self._entries, (lo,))
        return sum(self._work[start:bisect_left(self._entries, (hi,))])


class WaitingQueue:
    def __init__(self, order: OrderKey):
        self.order = order
        self._started: list = []    # [(key, seq, req)] started, paused between chunks
        self._low: list = []        # not started, low priority, not relegated
        self._fresh: list = []      # not started, the rest
        self._seq = 0
        self.started_work = 0       # remaining prefill of the started ones
        self.ledger: WorkLedger | None = None

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
        entry = (self.key(req), self._seq, req)
        if req.started:
            heap = self._started
            self.started_work += req.num_remaining_prefill
        else:
            heap = self._low if req.priority is Priority.LOW and not req.relegated else self._fresh
            if self.ledger is not None:
                self.ledger.add(entry[:2], req.num_remaining_prefill)
        heapq.heappush(heap, entry)

    def _left(self, heap: list, entry: tuple) -> Request:
        """Book-keeping for an entry that left `heap`."""
        req = entry[2]
        if heap is self._started:
            self.started_work -= req.num_remaining_prefill
        elif self.ledger is not None:
            self.ledger.remove(entry[:2])
        return req

    def track_work(self) -> None:
        """Start keeping the ledger (from what waits now on)."""
        if self.ledger is None:
            self.ledger = WorkLedger()
            for heap in (self._low, self._fresh):
                for key, seq, req in heap:
                    self.ledger.add((key, seq), req.num_remaining_prefill)

    def work_before(self, key: tuple, since: tuple | None = None) -> int:
        """Prefill work queued ahead of `key`: every started prefill, and the not-started requests whose key
        is below `key` (and at least `since`, if given)."""
        self.track_work()
        return self.started_work + self.ledger.between(since, key)

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
        heap = min(heads, key=lambda h: h[0])
        return self._left(heap, heapq.heappop(heap))

    def pop_low(self) -> Request | None:
        """The most urgent waiting low-priority request that is not relegated, if any."""
        return self._left(self._low, heapq.heappop(self._low)) if self._low else None

    def remove(self, req: Request) -> bool:
        """Take `req` out wherever it waits (an aborted request); False if it is not queued. O(n): rare."""
        for heap in (self._started, self._low, self._fresh):
            for k, entry in enumerate(heap):
                if entry[2] is req:
                    self._left(heap, entry)
                    heap[k] = heap[-1]
                    heap.pop()
                    heapq.heapify(heap)
                    return True
        return False

    def __iter__(self):
        """Requests in no particular order."""
        for _, _, req in self._fresh + self._low + self._started:
            yield req
