"""Recovery when late: decodes past their deadlines no longer pin the token budget to the smallest chunk."""

import numpy as np
import pytest

from niyama.metrics import request_records
from niyama.metrics.records import is_violated
from niyama.running import RunningDecodes
from niyama.sim import simulate
from niyama.workload import make_workload

from helpers import PREDICTOR, kv, req, scheduler, start_decode


def budget(decodes, allocator, now, late_recovery=True):
    s = scheduler("niyama", late_recovery=late_recovery)
    s.add_request(req(0, now - 0.1, 5000))
    return s.schedule(now, decodes, allocator, 1).token_budget


def q1_decode(decodes, allocator, rid, token2_due_s, prompt=500):
    """A Q1 decode (50 ms pace) whose second token is due at `token2_due_s` in iteration 1."""
    first = token2_due_s - 0.05
    return start_decode(decodes, allocator, req(rid, first - 6.0, prompt, output=100), first_token_s=first)


def member(decodes, rid):
    return next(r for r in decodes if r.request_id == rid)


def step_s(total, num_decodes, context):
    return PREDICTOR.batch_time(total - num_decodes, num_decodes, context, 0)


def test_late_split_separates_late_decodes_from_the_earliest_deadline_still_ahead():
    allocator, decodes = kv(), RunningDecodes()
    for rid, due in enumerate((16.00, 16.03, 16.07, 16.12)):
        q1_decode(decodes, allocator, rid, due)
    batch = start_decode(decodes, allocator, req(9, 0.0, 100, tier="Q2"), first_token_s=594.0)   # 400 ms pace
    assert decodes.late_split(16.05, 1) == (pytest.approx(16.07), 0.05)
    assert decodes.late_split(15.0, 1) == (pytest.approx(16.00), float("inf"))
    decodes.remove(member(decodes, 2), 1)
    assert decodes.late_split(16.05, 1)[0] == pytest.approx(16.12)     # removed entries are skipped
    assert decodes.late_split(600.0, 1) == (float("inf"), 0.05)        # everyone late; Q1's pace is the least
    decodes.remove(batch, 1)
    assert decodes.late_split(600.0, 1) == (float("inf"), 0.05)


def test_every_decode_late_gets_the_largest_chunk_that_keeps_its_pace():
    allocator, decodes = kv(), RunningDecodes()
    q1_decode(decodes, allocator, 50, token2_due_s=16.05)
    # 10 ms late: the old rule says 128; re-anchored at now, 1.2 x predicted(256) = 43 ms fits its 50 ms pace
    assert budget(decodes, allocator, now=16.06, late_recovery=False) == 128
    assert budget(decodes, allocator, now=16.06) == 256
    ctx = decodes.context_sum(1)
    assert 1.2 * step_s(256, 1, ctx) <= 0.05 < 1.2 * step_s(512, 1, ctx)


def test_a_decode_still_on_time_keeps_its_slack():
    allocator, decodes = kv(), RunningDecodes()
    q1_decode(decodes, allocator, 50, token2_due_s=16.05)      # late at 16.06
    q1_decode(decodes, allocator, 51, token2_due_s=16.095)     # 35 ms of slack left
    assert budget(decodes, allocator, now=16.06) == 128        # 1.2 x predicted(256) = 43 ms > 35 ms
    ctx = decodes.context_sum(1)
    assert 1.2 * step_s(128, 2, ctx) <= 0.035 < 1.2 * step_s(256, 2, ctx)
    allocator, decodes = kv(), RunningDecodes()
    q1_decode(decodes, allocator, 50, token2_due_s=16.05)
    q1_decode(decodes, allocator, 51, token2_due_s=17.0)       # plenty of slack: the late one's pace binds
    assert budget(decodes, allocator, now=16.06) == 256


def test_a_late_batch_decode_allows_what_fits_its_400ms_pace():
    allocator, decodes = kv(), RunningDecodes()
    start_decode(decodes, allocator, req(50, 0.0, 100, tier="Q2"), first_token_s=594.0)   # token 2 due 594.4
    assert budget(decodes, allocator, now=594.5, late_recovery=False) == 128
    assert budget(decodes, allocator, now=594.5) == 2552       # 1.2 x 250 ms fits 400 ms


def test_when_no_chunk_keeps_pace_the_least_ground_lost_per_prefill_token():
    # 120 late decodes of 2000-token prompts: even a decode-only step (53 ms) is slower than the 50 ms pace, so
    # every step loses ground; the old rule's 128 runs 8 prefill tokens per 54 ms step
    allocator, decodes = kv(), RunningDecodes()
    for k in range(120):
        q1_decode(decodes, allocator, 100 + k, token2_due_s=16.0, prompt=2000)
    ctx = decodes.context_sum(1)
    assert step_s(120, 120, ctx) > 0.05
    lost = {t: (step_s(t, 120, ctx) - 0.05) / (t - 120) for t in (128, 256, 512, 768, 1024, 2552)}
    assert min(lost, key=lost.get) == 768                      # 0.46 / 0.10 / 0.089 / 0.085 / 0.088 / 0.093 ms
    assert budget(decodes, allocator, now=16.1, late_recovery=False) == 128
    assert budget(decodes, allocator, now=16.1) == 768


def run(workload, slower, late_recovery):
    """Simulate with batches taking `slower` x what the scheduler's profile predicts (no online correction)."""
    steps = []       # (token budget, min slack, step seconds) of iterations that ran a prefill
    res = simulate(workload, "niyama", executor_profile=f"a100-llama3-8b*{slower}", online_correction=False,
                   policy_options={"late_recovery": late_recovery},
                   on_step=lambda plan, result, end: plan.prefills and steps.append(
                       (plan.token_budget, plan.min_slack_s, result.duration_s)))
    budgets, slack, seconds = np.array(steps).T
    late_min = (budgets == 128) & (slack <= 0)
    q1 = [r for r in res.requests if r.tier.name == "Q1"]
    return {
        "late_min_share": late_min.mean(),
        "late_min_step_s": np.median(seconds[late_min]) if late_min.any() else 0.0,
        "strict": request_records(q1, res.iteration_end_s, 10**9)["violated_strict"].mean(),
        "violated": np.mean([is_violated(r) for r in res.requests]),
        "backlog_s": res.backlog_s,
        "end_s": res.iteration_end_s[-1],
    }


def test_a_2x_slow_machine_no_longer_locks_the_budget_at_the_smallest_chunk():
    # azure-code at 2 QPS is 0.43 x capacity with a right profile (no violation); here every step takes 2x the
    # prediction. Seeded: the old rule runs 80% of its prefill steps late at 128 tokens (56 ms each, over the
    # 50 ms pace), strict 22.6%, 124 s backlog, 0.17% violated; late recovery: 7%, strict 20.4%, 46 s, none
    wl = make_workload("azure-code", 2.0, num_requests=3000, seed=0)
    old, new = run(wl, 2, late_recovery=False), run(wl, 2, late_recovery=True)
    assert old["late_min_share"] > 0.7 and old["late_min_step_s"] > 0.05 and old["strict"] > 0.15
    assert new["late_min_share"] < 0.2
    assert new["backlog_s"] < 0.5 * old["backlog_s"]
    assert new["strict"] < old["strict"] - 0.01
    assert new["violated"] < old["violated"]


def test_a_right_profile_is_not_affected():
    wl = make_workload("azure-code", 4.0, num_requests=1500, seed=0)
    old, new = run(wl, 1, late_recovery=False), run(wl, 1, late_recovery=True)
    assert old["late_min_share"] == 0 and old == new
