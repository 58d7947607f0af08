"""RunningDecodes over a long run: the heaps keep no trace of decodes that left (a server runs for days)."""

import random

import pytest

from niyama.qos import Tier
from niyama.request import Phase, Request
from niyama.running import RunningDecodes

from helpers import RULE


def test_heaps_stay_bounded_and_exact_when_steps_outpace_the_token_pace():
    """Steps of 10 ms against a 50 ms pace: newer decodes' heap keys are smaller, so dead entries sink and
    would never be popped. Requests with their own pace (explicit targets) come and go too."""
    rng = random.Random(0)
    decodes = RunningDecodes()
    live: list[Request] = []
    now = 0.0
    for i in range(20_000):
        now += 0.01
        tbt = 0.05 if rng.random() < 0.9 else rng.choice([0.03, 0.04, 0.07]) + rng.random() / 1000
        r = Request(i, now, 8, 1000, Tier("custom", ttft_s=1.0, tbt_s=tbt), RULE)
        r.move_to(Phase.PREFILL)
        r.num_computed_tokens = r.num_prefill_target
        r.num_output_tokens = 1
        r.first_token_s = r.anchor_s = now
        r.token_segments.append([i, i + 1])
        decodes.add(r, i)
        live.append(r)
        if len(live) > 32:                       # one leaves for each that joins: 32 running
            decodes.remove(live.pop(rng.randrange(len(live))), i + 1)
        assert decodes.num_heap_entries <= 2 * (3 * len(decodes) + 64)
        if i % 997 == 0:
            want = min(decodes.next_deadline(d, i + 1) for d in decodes)
            assert decodes.min_deadline(i + 1) == pytest.approx(want, abs=1e-9)
    paces = {d.tbt_s for d in decodes}       # heaps of paces gone since the last compaction may wait for the next
    assert len(decodes._deadline_heaps) <= len(paces) + 2 * len(decodes) + 65
