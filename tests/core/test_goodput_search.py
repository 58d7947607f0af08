"""The goodput search (`metrics/goodput_search.py`) on plain functions: no simulation."""

import pytest

from niyama.metrics.goodput_search import Point, interpolate, search_capacity, search_sustainable


def linear_violations(q: float) -> Point:
    v = max(0.0, (q - 2.0) * 10.0)          # 0% up to 2 QPS, then +10% per QPS: 1% at exactly 2.1
    return Point(q, v, v <= 1.0)


def test_interpolation_between_bracketing_points():
    lo, hi = Point(2.0, 0.5, True), Point(2.5, 3.0, False)
    assert interpolate(lo, hi, 1.0) == pytest.approx(2.0 + 0.5 * 0.5 / 2.5)


@pytest.mark.parametrize("start", [0.3, 1.0, 2.1, 7.0, 40.0])
def test_search_finds_the_crossing_from_any_start(start):
    res = search_capacity(linear_violations, start)
    assert res.qps == pytest.approx(2.1, rel=1e-9)          # linear truth: interpolation is exact
    assert res.lo.passed and not res.hi.passed
    assert res.hi.qps / res.lo.qps - 1 <= 0.03
    assert len(res.points) <= 20          # even from 20x off


def test_search_edges():
    never = search_capacity(lambda q: Point(q, 50.0, False), 1.0)
    assert never.qps == 0.0 and never.lo is None
    always = search_capacity(lambda q: Point(q, 0.0, True), 1.0, max_qps=10)
    assert always.hi is None and always.qps >= 10 / 1.3


def test_sustainable_search_steps_down_until_a_pass():
    long = lambda q: Point(q, 0.0, q <= 1.5)
    res = search_sustainable(long, 2.0)
    assert res.qps >= 1.45 and res.qps <= 1.5
