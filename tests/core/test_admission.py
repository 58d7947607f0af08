"""Admission control (a tier's `on_infeasible = reject`): the work ledger, the first-token prediction, and what
rejecting does in seeded simulations next to relegating."""

import json
import math
import random

import numpy as np
import pytest

from niyama.metrics import summarize
from niyama.metrics.summary import tier_violations
from niyama.qos import Priority, Tier, load_tiers, with_admission
from niyama.request import Phase
from niyama.scheduler.batch_plan import BatchPlan, PrefillChunk
from niyama.scheduler.queue import WaitingQueue
from niyama.scheduler.relegation import wait_with_arrivals
from niyama.sim import simulate
from niyama.workload import make_workload

from helpers import PREDICTOR, req, scheduler


def test_the_work_ledger_agrees_with_a_walk_of_the_queue():
    rng = random.Random(3)
    q = WaitingQueue(lambda r: r.arrival_s + r.ttft_s + 0.008 * r.num_remaining_prefill)
    q.track_work()
    live = []
    for k in range(400):
        op = rng.random()
        if op < 0.55 or not live:
            r = req(k, rng.uniform(0, 100), rng.randint(1, 3000), tier=rng.choice(["Q1", "Q2", "Q3"]),
                    priority=rng.choice([Priority.IMPORTANT, Priority.LOW]))
            r.relegated = rng.random() < 0.1
            q.push(r)
            live.append(r)
        elif op < 0.7:
            live.remove(q.pop())
        elif op < 0.8:
            low = q.pop_low()
            if low is not None:
                live.remove(low)
        else:
            victim = rng.choice(live)
            assert q.remove(victim)
            live.remove(victim)
        key = (False, rng.uniform(0, 2000))
        since = (False, rng.uniform(0, 200))
        expect = sum(r.num_remaining_prefill for r in live if since <= q.key(r) < key)
        assert q.work_before(key, since) == expect
        assert q.work_before(key) == sum(r.num_remaining_prefill for r in live if q.key(r) < key)


def test_prediction_counts_the_work_queued_ahead_and_skips_the_overdue():
    s = scheduler("niyama", foresee_arrivals=False)
    rate = s.admission_rate.tokens_per_s
    overdue = req(0, 0.0, 5000, tier="Q1")       # key ~46 s: past its deadline at now = 100
    ahead = req(1, 99.0, 1700, tier="Q1")        # key ~118.6 s
    behind = req(2, 99.5, 8500, tier="Q2")       # key ~760 s
    for r in (overdue, ahead, behind):
        s.add_request(r)
    new = req(3, 100.0, 850, tier="Q1")          # key 112.8 s: before `ahead`
    assert s.predicted_first_token_s(100.0, new) == pytest.approx(100.0 + 850 / rate)
    late = req(4, 100.0, 850, tier="Q2")         # key ~701 s: after both Q1s, before `behind`
    assert s.predicted_first_token_s(100.0, late) == pytest.approx(100.0 + (1700 + 850) / rate)
    fcfs = scheduler("fcfs", foresee_arrivals=False)   # no relegation: the overdue request still runs first
    for r in (req(10, 0.0, 5000), req(11, 99.0, 1700)):
        fcfs.add_request(r)
    assert fcfs.predicted_first_token_s(100.0, req(12, 100.0, 850)) == pytest.approx(
        100.0 + (5000 + 1700 + 850) / fcfs.admission_rate.tokens_per_s)


def test_arrivals_of_tighter_tiers_lengthen_the_wait():
    assert wait_with_arrivals(2.0, []) == 2.0
    assert wait_with_arrivals(2.0, [(1e9, 0.5)]) == pytest.approx(4.0)          # half the replica taken
    assert wait_with_arrivals(2.0, [(1.0, 0.5)]) == pytest.approx(2.5)          # they stop sorting ahead at 1 s
    assert wait_with_arrivals(2.0, [(math.inf, 1.0)]) == math.inf                # they take all of it, forever
    assert wait_with_arrivals(2.0, [(1e3, 1.0)]) == pytest.approx(1002.0)        # ... until they stop sorting ahead
    lanes = [(3.0, 0.3), (10.0, 0.4), (-5.0, 0.9)]                                # a looser tier never sorts ahead
    x = wait_with_arrivals(2.0, lanes)
    assert x == pytest.approx(2.0 + sum(share * min(x, cap) for cap, share in lanes if cap > 0))
    s = scheduler("niyama", foresee_arrivals=True)
    for k in range(50):                             # a Q1 stream of 6000 tokens/s for 50 s
        s.add_request(req(k, float(k), 6000, tier="Q1"))
        s.waiting.pop()
    q3 = req(99, 50.0, 1000, tier="Q3")
    alone_s = 1000 / s.admission_rate.tokens_per_s
    assert s.predicted_first_token_s(50.0, q3) - 50.0 > 1.5 * alone_s     # Q1's arrivals will go first
    q1 = req(98, 50.0, 1000, tier="Q1")
    assert s.predicted_first_token_s(50.0, q1) == pytest.approx(50.0 + alone_s)   # nothing tighter than Q1


def test_on_infeasible_from_the_cli_and_tier_files(tmp_path):
    tiers = load_tiers("default")
    assert all(t.on_infeasible == "relegate" for t in tiers)
    assert [t.on_infeasible for t in with_admission(tiers, "reject")] == ["reject"] * 3
    assert [t.on_infeasible for t in with_admission(tiers, "Q1=reject")] == ["reject", "relegate", "relegate"]
    for bad in ("Q9=reject", "Q1=drop", "maybe"):
        with pytest.raises(ValueError, match="--on-infeasible"):
            with_admission(tiers, bad)
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps([{"name": "chat", "ttft_ms": 2000, "tbt_ms": 40, "on_infeasible": "reject"},
                                {"name": "batch", "ttlt_ms": 3600000}]))
    assert [t.on_infeasible for t in load_tiers(str(path))] == ["reject", "relegate"]
    with pytest.raises(ValueError, match="on_infeasible"):
        Tier("x", ttlt_s=1.0, on_infeasible="drop")


@pytest.fixture(scope="module")
def overload_runs():
    """Azure Code at 1.5 x niyama's capacity for 20 minutes, 80% of it Q1: Q1 relegating vs Q1 rejecting (the
    same requests)."""
    kw = dict(num_requests=8400, seed=5, tier_mix="80,10,10")
    runs = {}
    for mode in ("relegate", "Q1=reject"):
        wl = make_workload("azure-code", 7.0, on_infeasible=mode, **kw)
        runs[mode] = wl, simulate(wl, "niyama")
    return runs


def test_rejected_requests_never_run_and_hold_nothing(overload_runs):
    _, result = overload_runs["Q1=reject"]
    rejected = [r for r in result.requests if r.rejected]
    assert rejected and {r.tier.name for r in rejected} == {"Q1"}
    for r in rejected:
        assert r.phase is Phase.DONE and not r.block_ids and r.first_token_s is None
        assert r.num_output_tokens == 0 and r.num_computed_tokens == 0
        assert r.predicted_first_token_s > r.first_token_deadline_s
        assert r.arrival_s <= r.finish_s < r.arrival_s + 1.0      # turned away at once
    _, relegating = overload_runs["relegate"]
    assert not any(r.rejected for r in relegating.requests)


def test_rejecting_q1_keeps_the_admitted_q1_requests_on_time(overload_runs):
    (wl, relegating), (_, rejecting) = overload_runs["relegate"], overload_runs["Q1=reject"]
    s_rel, _ = summarize(relegating)
    s_rej, rec = summarize(rejecting)
    q1_rel, q1_rej = s_rel.tiers[0], s_rej.tiers[0]
    assert q1_rel.violation_pct > 5                      # the overload hurts Q1 when it relegates
    assert q1_rej.violation_pct < 0.75 * q1_rel.violation_pct     # measured: 10.4% -> 5.8%
    assert q1_rej.rejected == s_rej.rejected > 0 and q1_rej.count == q1_rel.count
    # violations are over the admitted requests; the capacity search counts a rejection as a violation
    admitted = (rec["tier"] == "Q1") & ~rec["rejected"]
    assert q1_rej.violation_pct == pytest.approx(100 * rec["violated"][admitted].mean())
    assert np.isnan(rec["ttft_s"][rec["rejected"]]).all()
    assert tier_violations(rejecting)["Q1"] == pytest.approx(
        100 * (rec["violated"] | rec["rejected"])[rec["tier"] == "Q1"].mean())


def test_admission_counts_decode_only_steps_while_work_waits():
    """Between prefill chunks an overloaded replica runs steps with no prefill (the decodes' slack leaves no
    budget, or no slot is free); a waiting request's first token waits through them too. Admission's rate
    counts their time; relegation's per-step rate does not."""
    s = scheduler("niyama", foresee_arrivals=False)
    s.add_request(req(0, 0.0, 4000, tier="Q1"))                  # work waits throughout
    with_prefill = BatchPlan(1, 8, 800, [PrefillChunk(req(1, 0.0, 500), 0, 500)], 508, 0.0, [], [])
    decode_only = BatchPlan(2, 8, 808, [], 8, 0.0, [], [])
    for _ in range(3000):                                        # one 0.1 s chunk of 500 tokens, then 0.1 s without
        s.observe(with_prefill, 0.1)
        s.observe(decode_only, 0.1)
    assert s.prefill_rate.tokens_per_s == pytest.approx(5000, rel=0.01)      # per step with prefill
    assert s.admission_rate.tokens_per_s == pytest.approx(2500, rel=0.01)    # per second of wall time
    new = req(5, 10.0, 1000, tier="Q3")
    assert s.predicted_first_token_s(10.0, new) == pytest.approx(10.0 + (4000 + 1000) / 2500, rel=0.01)
    idle = scheduler("niyama")                                    # nothing waits: idle steps say nothing
    before = idle.admission_rate.tokens_per_s
    idle.observe(decode_only, 0.1)
    assert idle.admission_rate.tokens_per_s == before


def test_admission_starts_from_the_batch_time_model():
    """Before any step is seen, the rate is what the profile predicts for a prefill-only step (not a fixed
    8,500 tokens/s, which a CPU replica is far from)."""
    s = scheduler("niyama")
    assert s.admission_rate.tokens_per_s == pytest.approx(512 / PREDICTOR.batch_time(512, 0, 0, 0, 0))
