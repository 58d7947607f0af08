"""Capacity studies on real traces (`sim/capacity_study.py`): minutes of simulation."""

import pytest

from niyama.sim.capacity_study import CapacityJob, find_capacity
from niyama.sim.scenario import Scenario


def test_capacity_on_a_real_trace_orders_the_policies():
    """Seeded 4-hour runs on ShareGPT: niyama > edf > fcfs, each near the paper's Fig. 7."""
    caps = {}
    for policy in ("fcfs", "edf", "niyama"):
        job = CapacityJob(Scenario("sharegpt", policy), sustainable=False)   # 4-hour runs
        caps[policy] = find_capacity(job).capacity_qps
    assert caps["niyama"] > caps["edf"] > caps["fcfs"] > 0
    for policy, paper in (("fcfs", 1.4), ("edf", 1.8), ("niyama", 2.1)):
        assert caps[policy] == pytest.approx(paper, rel=0.15), caps
