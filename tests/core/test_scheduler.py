"""Each policy's order and budget on hand-built scenarios, with the exact batches expected."""

import pytest

from niyama.qos import Priority
from niyama.request import Phase
from niyama.running import RunningDecodes

from helpers import PREDICTOR, chunks, kv, req, scheduler, start_decode


def plan_for(name, requests, now, decodes=None, allocator=None, iteration=1, **overrides):
    s = scheduler(name, **overrides)
    for r in requests:
        s.add_request(r)
    return s.schedule(now, decodes or RunningDecodes(), allocator or kv(), iteration), s


def three_requests():
    # id, arrival, prompt, tier: EDF deadlines r0 = 594 s, r1 = 7 s, r2 = 6.5 s
    return [req(0, 0.0, 100, tier="Q2"), req(1, 1.0, 40, tier="Q1"), req(2, 0.5, 200, tier="Q1")]


@pytest.mark.parametrize("policy, expected", [
    ("fcfs", [(0, 0, 100), (2, 0, 156)]),                  # arrival order
    ("edf", [(2, 0, 200), (1, 0, 40), (0, 0, 16)]),        # first-token deadline order
    ("srpf", [(1, 0, 40), (0, 0, 100), (2, 0, 116)]),      # fewest remaining prefill tokens
])
def test_fixed_chunk_policies_fill_256_in_their_order(policy, expected):
    plan, _ = plan_for(policy, three_requests(), now=2.0)
    assert plan.token_budget == 256
    assert chunks(plan) == expected
    assert all(r.phase == Phase.PREFILL for r in (c.request for c in plan.prefills))


def test_fixed_chunk_budget_counts_every_decode():
    allocator, decodes = kv(), RunningDecodes()
    for k in range(10):
        start_decode(decodes, allocator, req(100 + k, 0.0, 50, output=100), first_token_s=1.0)
    plan, _ = plan_for("fcfs", [req(0, 0.5, 1000)], now=1.0, decodes=decodes, allocator=allocator)
    assert plan.num_decodes == 10
    assert chunks(plan) == [(0, 0, 246)]                    # 256 - 10 decodes
    assert plan.decode_context == 10 * 51                   # prompt + the first token, per decode


def test_plans_count_sampled_rows_for_the_time_model():
    """A plan's sampled rows: the running decodes that sample (counted as they join and leave the decode set)
    and the sampled prefills its chunks complete; niyama's budget search predicts with them."""
    allocator, decodes = kv(), RunningDecodes()
    started = [start_decode(decodes, allocator, req(100 + k, 0.0, 50, output=100, sampled=k % 3 == 0),
                            first_token_s=1.0) for k in range(9)]
    assert decodes.num_sampled == 3
    decodes.remove(started[0], 2)
    decodes.remove(started[1], 2)
    assert decodes.num_sampled == 2
    plan, _ = plan_for("fcfs", [req(0, 0.5, 100, sampled=True), req(1, 0.6, 1000, sampled=True)], now=1.0,
                       decodes=decodes, allocator=allocator, iteration=2)
    assert plan.num_sampled_decodes == 2 and [c.completes_prefill for c in plan.prefills] == [True, False]
    assert plan.num_sampled == 3            # request 1's chunk does not finish its prompt: it draws nothing yet

    seen = []

    class Recording:
        name = "recording"

        def batch_time(self, p, d, dctx, pctx, num_sampled=0):
            seen.append(num_sampled)
            return PREDICTOR.batch_time(p, d, dctx, pctx)

    s = scheduler("niyama")
    s.predictor = Recording()
    s.add_request(req(2, 0.5, 3000))
    s.schedule(1.0, decodes, allocator, 2)
    assert seen and set(seen) == {2}


def test_all_decodes_run_even_beyond_the_chunk():
    allocator, decodes = kv(), RunningDecodes()
    for k in range(300):
        start_decode(decodes, allocator, req(100 + k, 0.0, 20, output=100), first_token_s=1.0)
    plan, _ = plan_for("edf", [req(0, 0.5, 1000)], now=1.0, decodes=decodes, allocator=allocator,
                       max_num_seqs=512)
    assert plan.num_decodes == 300 and plan.prefills == []   # no prefill budget left, no decode dropped


def test_hybrid_priority_prefers_short_prompts_alpha0_is_edf():
    reqs = lambda: [req(0, 0.0, 2000), req(1, 1.0, 100)]   # keys: 0+6+16 = 22 vs 1+6+0.8 = 7.8
    plan, _ = plan_for("niyama", reqs(), now=1.0)
    assert plan.token_budget == 2552                         # no decodes: the largest candidate
    assert chunks(plan) == [(1, 0, 100), (0, 0, 2000)]
    plan, _ = plan_for("niyama-alpha0", reqs(), now=1.0)
    assert chunks(plan) == [(0, 0, 2000), (1, 0, 100)]


def on_schedule_decode(allocator, decodes):
    """One Q1 decode whose first token came exactly at D1 = 16 s: token 2 is due at 16.05 s."""
    return start_decode(decodes, allocator, req(50, 10.0, 500, output=100), first_token_s=16.0, iteration=0)


def test_dynamic_chunk_decode_on_a_50ms_schedule_gets_256_tokens():
    allocator, decodes = kv(), RunningDecodes()
    on_schedule_decode(allocator, decodes)
    plan, _ = plan_for("niyama", [req(0, 15.9, 5000)], now=16.0, decodes=decodes, allocator=allocator)
    assert plan.min_slack_s == pytest.approx(0.05)
    assert plan.token_budget == 256                          # 1.2 x predicted(256) = 43 ms <= 50 ms < 1.2 x predicted(512)
    assert chunks(plan) == [(0, 0, 255)]
    t256 = PREDICTOR.batch_time(255, 1, plan.decode_context, 0)
    t512 = PREDICTOR.batch_time(511, 1, plan.decode_context, 0)
    assert t256 * 1.2 <= 0.05 < t512 * 1.2


def test_dynamic_chunk_without_decodes_is_2552_and_late_decodes_get_128_in_the_papers_rule():
    plan, _ = plan_for("niyama", [req(0, 15.9, 5000)], now=16.0)
    assert plan.token_budget == 2552 and chunks(plan) == [(0, 0, 2552)]
    allocator, decodes = kv(), RunningDecodes()
    on_schedule_decode(allocator, decodes)
    plan, _ = plan_for("niyama", [req(0, 15.9, 5000)], now=16.06, decodes=decodes, allocator=allocator,
                       late_recovery=False)      # the default recovers when late: tests/core/test_late_recovery.py
    assert plan.min_slack_s < 0
    assert plan.token_budget == 128 and chunks(plan) == [(0, 0, 127)]


def test_dynamic_chunk_low_memory_candidates():
    allocator = kv(tokens=40_000)                 # 2500 blocks
    filler = req(99, 0.0, 10)
    allocator.allocate(filler, 600)               # 1900 free blocks = 30,400 tokens < 32,000
    plan, _ = plan_for("niyama", [req(0, 0.0, 5000)], now=1.0, allocator=allocator)
    assert plan.token_budget == 512


def test_fixed_chunk_ablation_ignores_slack():
    plan, _ = plan_for("niyama-no-dc", [req(0, 15.9, 5000)], now=16.0)
    assert plan.token_budget == 256


def test_eager_relegation_puts_hopeless_requests_last_but_still_serves_them():
    # now 5.5: 8000 tokens at 8500 tok/s end at 6.44 s > D1 = 6 s -> relegated
    reqs = lambda: [req(0, 0.0, 8000), req(1, 5.0, 100)]
    plan, s = plan_for("niyama-alpha0", reqs(), now=5.5)
    assert [r.request_id for r in plan.relegated] == [0]
    assert chunks(plan) == [(1, 0, 100), (0, 0, 2452)]     # relegated, yet it fills what is left
    assert reqs()[0].relegated is False
    # without relegation the earliest deadline simply goes first
    plan, _ = plan_for("edf-dc", reqs(), now=5.5)
    assert plan.relegated == [] and chunks(plan) == [(0, 0, 2552)]


def test_priority_relegation_sheds_low_requests_with_a_late_important_one():
    low = Priority.LOW
    # now 5.5: important r0 (8000 tokens, D1 = 6 s) is too late. Waiting low requests, most urgent
    # first: r1 (5000 tokens, key 11 s), r3 (4000, 11.2 s), r2 (6000, Q2, 595 s).
    reqs = lambda: [req(0, 0.0, 8000), req(1, 5.0, 5000, priority=low), req(2, 1.0, 6000, tier="Q2", priority=low),
                    req(3, 5.2, 4000, priority=low)]
    plan, s = plan_for("niyama", reqs(), now=5.5, alpha_s=0.0)
    assert [r.request_id for r in plan.relegated] == [0, 1, 3]   # 9000 low tokens shed >= the 8000 r0 needs
    assert chunks(plan) == [(2, 0, 2552)]                        # the only request left on time goes first
    assert sorted(r.request_id for r in s.waiting) == [0, 1, 3] and all(r.relegated for r in s.waiting)
    # without priority awareness only the late request itself is relegated
    plan, _ = plan_for("niyama-no-priority", reqs(), now=5.5, alpha_s=0.0)
    assert [r.request_id for r in plan.relegated] == [0] and chunks(plan) == [(1, 0, 2552)]
    # a low request that is too late is relegated alone
    plan, _ = plan_for("niyama", [req(4, 0.0, 8000, priority=low), req(5, 5.0, 100, priority=low)], now=5.5)
    assert [r.request_id for r in plan.relegated] == [4] and chunks(plan) == [(5, 0, 100), (4, 0, 2452)]


def test_started_prefills_are_never_relegated():
    allocator = kv()
    late = req(0, 0.0, 8000)                  # D1 = 6 s, already missed at 7 s
    allocator.allocate(late, allocator.blocks_for(8000))
    late.phase, late.num_computed_tokens = Phase.PREFILL, 2552
    plan, _ = plan_for("niyama-alpha0", [late, req(1, 5.0, 100)], now=7.0, allocator=allocator)
    assert plan.relegated == []
    assert chunks(plan) == [(0, 2552, 2552)]  # it keeps its place (key 6 s < 11 s) and continues


def test_max_num_seqs_caps_requests_holding_kv():
    allocator, decodes = kv(), RunningDecodes()
    start_decode(decodes, allocator, req(50, 0.0, 20, output=100), first_token_s=1.0)
    plan, _ = plan_for("fcfs", [req(k, 0.1 * k, 10) for k in range(3)], now=1.0, decodes=decodes,
                       allocator=allocator, max_num_seqs=3)
    assert chunks(plan) == [(0, 0, 10), (1, 0, 10)]          # 1 decode + 2 prefills = 3


def test_kv_exhaustion_preempts_the_latest_deadline_decode():
    allocator, decodes = kv(tokens=160, watermark=0.0), RunningDecodes()     # 10 blocks
    d1 = start_decode(decodes, allocator, req(1, 0.0, 32, output=50, tier="Q1"), first_token_s=1.0)   # 2 blocks
    d2 = start_decode(decodes, allocator, req(2, 0.0, 48, output=50, tier="Q2"), first_token_s=1.0)   # 3 blocks
    paused = req(3, 0.0, 80)
    allocator.allocate(paused, 5)
    paused.phase, paused.num_computed_tokens = Phase.PREFILL, 16
    assert allocator.num_free == 0
    plan, s = plan_for("niyama", [paused], now=1.01, decodes=decodes, allocator=allocator)
    # iteration 1 writes position 32 (d1) and 48 (d2): both need a block, none is free
    assert plan.preempted == [d2]                      # Q2's next token is due much later than Q1's
    assert d2.phase == Phase.WAITING and d2.block_ids == [] and d2.num_prefill_target == 48 + 1
    assert d2.num_preemptions == 1 and d2 in list(s.waiting)
    assert len(d1.block_ids) == 3 and list(decodes) == [d1]
    allocator.check([d1, paused] + [c.request for c in plan.prefills if c.request not in (d1, paused)])
    # much later, the preempted decode waits to recompute; it has started before, so it is never relegated
    later = s.schedule(1000.0, decodes, allocator, 2)
    assert later.relegated == [] and d2.relegated is False


def batch_decodes(n: int, allocator, ttlt_s: float = 86_400.0):
    """`n` running decodes of a batch job: their own TTLT tier of `ttlt_s`, so their next tokens are due late."""
    from niyama.qos import Tier
    tier = Tier("batch-window", ttlt_s=ttlt_s)
    decodes = RunningDecodes()
    lines = [start_decode(decodes, allocator, req(200 + k, 0.0, 32, output=400, tier=tier), first_token_s=1.0)
             for k in range(n)]
    return decodes, lines


def test_a_chat_request_without_a_slot_preempts_a_batch_line_due_hours_later():
    allocator = kv()
    decodes, lines = batch_decodes(4, allocator)
    chat = req(0, 1.5, 100, tier="Q1")
    plan, s = plan_for("niyama", [chat], now=2.0, decodes=decodes, allocator=allocator, max_num_seqs=4)
    assert len(plan.preempted) == 1 and plan.preempted[0] in lines
    assert [c.request for c in plan.prefills][:1] == [chat] and len(decodes) == 3
    victim = plan.preempted[0]
    assert victim.phase == Phase.WAITING and victim in list(s.waiting)
    allocator.check(list(decodes) + [chat])


def test_no_preemption_among_peers_when_off_or_when_the_blocked_request_is_late():
    # a batch line waiting behind other lines of its window: they are due as late as it is, nobody is preempted
    allocator = kv()
    decodes, _ = batch_decodes(4, allocator)
    from niyama.qos import Tier
    peer = req(9, 1.5, 100, tier=Tier("batch-window", ttlt_s=86_400.0))
    plan, _ = plan_for("niyama", [peer], now=2.0, decodes=decodes, allocator=allocator, max_num_seqs=4)
    assert plan.preempted == [] and plan.prefills == []
    # switched off (Sarathi's behaviour): the chat request waits for a slot
    allocator = kv()
    decodes, _ = batch_decodes(4, allocator)
    plan, _ = plan_for("niyama", [req(0, 1.5, 100, tier="Q1")], now=2.0, decodes=decodes, allocator=allocator,
                       max_num_seqs=4, preempt_for_urgent_s=0.0)
    assert plan.preempted == [] and plan.prefills == []
    # a chat request already past its first-token deadline is relegated, not served by preempting
    allocator = kv()
    decodes, _ = batch_decodes(4, allocator)
    plan, _ = plan_for("niyama", [req(0, 1.0, 100, tier="Q1")], now=30.0, decodes=decodes, allocator=allocator,
                       max_num_seqs=4)
    assert plan.preempted == []


def test_a_chat_request_without_kv_room_preempts_until_it_fits():
    allocator = kv(tokens=16 * 16, watermark=0.0)            # 16 blocks
    decodes, lines = batch_decodes(5, allocator)             # 2 blocks each, a third as the step writes token 33
    chat = req(0, 1.5, 16 * 8, tier="Q1")                    # 8 blocks
    assert allocator.shortfall(chat) > 0
    plan, _ = plan_for("niyama", [chat], now=2.0, decodes=decodes, allocator=allocator)
    assert plan.preempted and set(plan.preempted) <= set(lines)
    assert chat.phase == Phase.PREFILL and len(chat.block_ids) == 8
    assert allocator.num_free < 3                            # no more preempted than it needed (3 blocks each)
    allocator.check(list(decodes) + [chat])
