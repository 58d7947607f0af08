"""The set of running decodes, with O(log n) bookkeeping per iteration.

Every running decode emits one token in every iteration, so a
decode that emitted token `n0` in iteration `i0` emits token
`n0 + (i - i0)` in iteration `i`. From that one fact:

- its next-token deadline in iteration i is `c + i * tbt` with a constant
  `c`, so the minimum over all decodes is the minimum over a few heaps,
  one per token pace (`min_slack`) — no scan over decodes; the earliest
  deadline still ahead of a time walks each heap only through the decodes
  already late by then (`late_split`);
- the iteration in which it reaches `max_output_tokens` is known when it
  starts decoding (a finish heap);
- it needs a new KV block every 16 iterations, in the iterations congruent to
  a fixed residue (one bucket per residue);
- the sum of decode context lengths grows by the number of decodes;
- the number of sampled decodes (`Request.sampled`: the sampler's costlier rows) changes only when one
  joins or leaves.

Token times are not stored per token: a request records the iteration
ranges it decoded in, and the replica's iteration end times give the rest.
The engine may still stop a decode early (EOS, stop string, abort): `remove`.

A decode that leaves stays in the heaps as a dead entry, dropped when it
reaches the top. That is not enough in a server: when steps run faster than
the token pace (an H100 decode step is 7-20 ms against a 50 ms TBT), newer
decodes' constants `c` are smaller, so old dead entries sink and never reach
the top. So once dead entries outnumber the live ones the heaps are rebuilt
from the live ones (amortized O(1) per removal), and a pace no decode has
any more loses its heap: nothing grows with the number of requests served.
"""

from __future__ import annotations

import heapq
import math

from .request import Phase, Request


class RunningDecodes:
    def __init__(self, block_size: int = 16):
        self.block_size = block_size
        self._members: dict[Request, None] = {}        # insertion-ordered set
        self._deadline_heaps: dict[float, list] = {}   # tbt -> [(c, seq, req)]
        self._finish_heap: list = []                   # [(finish_iter, seq, req)]
        self._block_buckets: list[dict[Request, None]] = [{} for _ in range(block_size)]
        self._context_base = 0                         # sum(P - i0) over members
        self.num_sampled = 0                           # members with `sampled` set
        self._seq = 0
        self._dead = 0                                 # removals since the heaps were last compacted

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        return iter(self._members)

    def __contains__(self, req: Request) -> bool:
        return req in self._members

    # --- membership ------------------------------------------------------
    def add(self, req: Request, iteration: int) -> None:
        """`req` just emitted token `req.num_output_tokens` in `iteration` (its prefill ended)."""
        assert req.num_output_tokens < req.max_output_tokens, "a finished request does not decode"
        self._seq += 1
        seq = self._seq
        req.move_to(Phase.DECODE)
        req.decode_iter0 = iteration
        req.decode_token0 = req.num_output_tokens
        req.decode_seq = seq
        self._members[req] = None
        # token n is due at A + (n-1)*tbt; in iteration i, n = n0 + i - i0.
        c = req.anchor_s + (req.decode_token0 - 1 - iteration) * req.tbt_s
        heapq.heappush(self._deadline_heaps.setdefault(req.tbt_s, []), (c, seq, req))
        finish_iter = iteration + req.max_output_tokens - req.decode_token0
        heapq.heappush(self._finish_heap, (finish_iter, seq, req))
        # In iteration i > i0 the decode writes KV at position P + (i - i0 - 1).
        residue = (iteration + 1 - req.num_prefill_target) % self.block_size
        self._block_buckets[residue][req] = None
        self._context_base += req.num_prefill_target - iteration
        self.num_sampled += req.sampled

    def remove(self, req: Request, iteration: int) -> None:
        """Take `req` out before `iteration` runs (preemption, early stop after `iteration - 1`)."""
        self._sync_output(req, iteration - 1)
        del self._members[req]
        residue = (req.decode_iter0 + 1 - req.num_prefill_target) % self.block_size
        del self._block_buckets[residue][req]
        self._context_base -= req.num_prefill_target - req.decode_iter0
        self.num_sampled -= req.sampled
        req.decode_seq = -1   # invalidates its heap entries
        req.token_segments[-1][1] = iteration
        self._dead += 1
        if self._dead > 2 * len(self._members) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop every dead heap entry, and the heaps of paces no decode has."""
        def live(entries: list) -> list:
            kept = [e for e in entries if e[2].decode_seq == e[1]]
            heapq.heapify(kept)
            return kept
        heaps = {tbt: live(heap) for tbt, heap in self._deadline_heaps.items()}
        self._deadline_heaps = {tbt: heap for tbt, heap in heaps.items() if heap}
        self._finish_heap = live(self._finish_heap)
        self._dead = 0

    @property
    def num_heap_entries(self) -> int:
        """Entries in the heaps, live and dead (bounded by a multiple of the live decodes, plus a constant)."""
        return len(self._finish_heap) + sum(len(h) for h in self._deadline_heaps.values())

    def pop_finished(self, iteration: int) -> list[Request]:
        """Decodes that emitted their last token in `iteration` (already executed)."""
        done = []
        while self._finish_heap and self._finish_heap[0][0] <= iteration:
            _, seq, req = heapq.heappop(self._finish_heap)
            if req.decode_seq == seq:
                done.append(req)
        for req in done:                  # (a removal may compact the heaps)
            self.remove(req, iteration + 1)
        return done

    # --- queries for iteration `i` (not yet executed) -------------------
    def min_deadline(self, iteration: int) -> float:
        """Earliest next-token deadline among running decodes; inf if none."""
        best = math.inf
        for tbt, heap in self._deadline_heaps.items():
            while heap and heap[0][2].decode_seq != heap[0][1]:
                heapq.heappop(heap)
            if heap:
                best = min(best, heap[0][0] + iteration * tbt)
        return best

    def late_split(self, now: float, iteration: int) -> tuple[float, float]:
        """(earliest next-token deadline still after `now`, smallest pace among decodes already due by `now`),
        inf where there is none. Walks each heap only through its late entries."""
        ahead, late_tbt = math.inf, math.inf
        for tbt, heap in self._deadline_heaps.items():
            stack = [0]
            while stack:
                k = stack.pop()
                if k >= len(heap):
                    continue
                c, seq, req = heap[k]
                deadline = c + iteration * tbt
                if deadline >= ahead:
                    continue                      # nothing below it is earlier
                if req.decode_seq == seq:         # live entry
                    if deadline > now:
                        ahead = deadline
                        continue
                    late_tbt = min(late_tbt, tbt)
                stack += (2 * k + 1, 2 * k + 2)
        return ahead, late_tbt

    def next_deadline(self, req: Request, iteration: int) -> float:
        return req.anchor_s + (req.decode_token0 - 1 + iteration - req.decode_iter0) * req.tbt_s

    def latest_deadline(self, iteration: int) -> Request:
        """The decode whose next token is due last: the KV-preemption victim."""
        return max(self._members, key=lambda r: (self.next_deadline(r, iteration), r.request_id))

    def context_sum(self, iteration: int) -> int:
        """Sum of decode context lengths (tokens attended) in `iteration`."""
        return self._context_base + len(self._members) * iteration

    def needing_block(self, iteration: int) -> list[Request]:
        """Decodes whose KV write in `iteration` starts a new block."""
        return list(self._block_buckets[iteration % self.block_size])

    def num_output_at(self, req: Request, iteration: int) -> int:
        """Tokens emitted by `req` once `iteration` has run."""
        return req.decode_token0 + iteration - req.decode_iter0

    def _sync_output(self, req: Request, last_iteration: int) -> None:
        req.num_output_tokens = self.num_output_at(req, last_iteration)
