"""Online correction of the batch-time profile: it learns the ratio of measured to predicted step time per
kind of step, stays put when the profile is right, and in the simulator a scheduler planning with a profile
1.5x too fast recovers the deadlines of one planning with the right profile."""

import math

import pytest

from niyama.metrics import summarize
from niyama.predictor import load_profile
from niyama.predictor.online import OnlineCorrection
from niyama.sim import simulate
from niyama.workload import make_workload

A100 = load_profile("a100-llama3-8b")
SHAPES = [(0, 32, 32 * 900, 0), (200, 56, 56 * 700, 1024), (2000, 40, 40 * 800, 4096)]   # decode-only, small, large


def test_it_learns_each_kind_of_step_apart_and_stays_bounded():
    c = OnlineCorrection(A100, weight=0.1, bound=4.0)
    assert c.ratios == {"decode-only": 1.0, "small": 1.0, "large": 1.0}
    factors = (1.6, 0.7, 1.0)
    for _ in range(100):
        for shape, f in zip(SHAPES, factors):
            c.observe(*shape, f * A100.batch_time(*shape))
    for (kind, ratio), f in zip(c.ratios.items(), factors):
        assert ratio == pytest.approx(f, rel=1e-3), kind
    for shape, f in zip(SHAPES, factors):
        assert c.batch_time(*shape) == pytest.approx(f * A100.batch_time(*shape), rel=1e-3)
    for _ in range(200):                               # a wildly slow step is clipped to the bound
        c.observe(*SHAPES[0], 100 * A100.batch_time(*SHAPES[0]))
    assert c.ratios["decode-only"] == pytest.approx(4.0, rel=1e-6)
    c.observe(*SHAPES[1], 0.0)                         # a step without a duration teaches nothing
    assert c.ratios["small"] == pytest.approx(0.7, rel=1e-3)


def test_a_right_profile_is_left_alone():
    c = OnlineCorrection(A100)
    for _ in range(50):
        for shape in SHAPES:
            c.observe(*shape, A100.batch_time(*shape))
    assert all(math.isclose(r, 1.0) for r in c.ratios.values())


def test_a_wrong_profile_costs_deadlines_and_the_correction_wins_them_back():
    """Azure Conv at 2.5 QPS on a replica 1.5x slower than the profile says: measured Q1 strict violations
    0.10% with the right profile, 3.25% planning with the wrong one, 0.10% with the wrong one corrected."""
    wl = make_workload("azure-conv", 2.5, num_requests=3000, seed=0)

    def q1_strict(**kw) -> float:
        summary, _ = summarize(simulate(wl, "niyama", **kw))
        return summary.tiers[0].strict_violation_pct

    right = q1_strict(profile="a100-llama3-8b*1.5")
    wrong = q1_strict(executor_profile="a100-llama3-8b*1.5")
    corrected = q1_strict(executor_profile="a100-llama3-8b*1.5", online_correction=True)
    assert wrong > right + 2                     # the wrong profile costs deadlines...
    assert corrected <= right + 0.5              # ...which the correction wins back
    assert q1_strict(online_correction=True) == q1_strict()   # and with the right profile it changes nothing
