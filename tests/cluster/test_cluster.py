"""Fleets in one simulated clock: the loop against the single-replica simulator, routers, silos, the
planner, `niyama plan` and the cluster experiment."""

import dataclasses
import json

import numpy as np
import pytest

from niyama.cli import main
from niyama.cluster import ROUTERS, make_fleet, make_router, parse_fleet, simulate_cluster
from niyama.cluster.planner import Evaluation, PlanSetup, evaluate_pool, smallest_passing
from niyama.cluster.sim import NodeLoad, route, route_of
from niyama.metrics import summarize, token_times
from niyama.routing import View
from niyama.request import Phase
from niyama.sim import simulate
from niyama.workload import make_workload

from helpers import TIERS, fleet_nodes, queue_on, req


def same_requests(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.request_id, x.first_token_s, x.finish_s, x.token_segments, x.relegated, x.num_preemptions) == \
            (y.request_id, y.first_token_s, y.finish_s, y.token_segments, y.relegated, y.num_preemptions)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_one_replica_behind_the_cluster_is_the_single_replica_simulator(router):
    wl = make_workload("azure-conv", 8.0, num_requests=700, seed=2)
    alone = simulate(wl, "niyama", noise=0.05, seed=7, kv_tokens=30_000)
    fleet = simulate_cluster(wl, make_fleet("shared:1", wl.tiers, router=router), noise=0.05, seed=7,
                             kv_tokens=30_000)
    assert alone.num_preemptions > 0 and alone.num_relegations > 0   # those paths are compared too
    same_requests(alone.requests, fleet.requests)
    assert fleet.iteration_end_s == alone.iteration_end_s
    assert summarize(fleet)[0] == dataclasses.replace(summarize(alone)[0], policy=fleet.policy)


def test_a_round_robin_replica_is_the_single_replica_simulator_on_every_nth_request():
    """What the planner relies on: replica j of a round-robin pool of n serves requests j, j+n, ... exactly."""
    wl = make_workload("azure-conv", 9.0, num_requests=900, seed=4)
    fleet = simulate_cluster(wl, make_fleet("shared:3", wl.tiers, router="round-robin"))
    for j in range(3):
        alone = simulate(dataclasses.replace(wl, specs=wl.specs[j::3]), "niyama", seed=j)
        served = [r for r, k in zip(fleet.requests, fleet.replica_of) if k == j]
        assert [r.first_token_s for r in served] == [r.first_token_s for r in alone.requests]
        assert [r.finish_s for r in served] == [r.finish_s for r in alone.requests]


def test_round_robin_counts_and_replica_stats():
    wl = make_workload("azure-code", 4.0, num_requests=100, seed=0)
    res = simulate_cluster(wl, make_fleet("shared:3", wl.tiers, router="round-robin"))
    assert list(res.replica_of) == [i % 3 for i in range(100)]
    assert [s.num_requests for s in res.replicas] == [34, 33, 33]
    assert sum(sum(s.tier_requests.values()) for s in res.replicas) == 100
    assert res.num_iterations == sum(s.num_iterations for s in res.replicas) == len(res.iteration_end_s)
    assert 0 < res.utilization <= 1


def test_least_loaded_sends_to_the_idle_replica_whatever_its_turn():
    ns = fleet_nodes(3)
    queue_on(ns[0], [req(1, 0.0, 5000)])
    queue_on(ns[2], [req(2, 0.0, 3000)])
    router = make_router("least-loaded")
    assert [route(router, 0.0, req(10 + k, 0.0, 100), ns) for k in range(3)] == [1, 1, 1]


def test_qos_avoids_a_replica_where_the_request_would_be_late():
    """Replica 0 holds 60K tokens of Q1 prompts (a new Q1 request's first token ~7 s away at 8.5K tokens/s, past
    its 6 s TTFT); replica 1 holds three times the work, all Q3, which a Q1 request jumps. Least-loaded picks
    replica 0; qos picks replica 1. A Q3 request, which waits behind everything, goes to replica 0."""
    ns = fleet_nodes(2)
    queue_on(ns[0], [req(k, 0.0, 1000) for k in range(60)])
    queue_on(ns[1], [req(100 + k, 0.0, 6000, tier="Q3") for k in range(30)])
    q1 = req(200, 0.1, 1000)                          # sorts after the 60 queued Q1 prompts of its size
    qos = make_router("qos")
    assert route(make_router("least-loaded"), 0.1, q1, ns) == 0
    views = [View(NodeLoad(n, 0.1, q1)) for n in ns]
    assert [qos.comfortable(v, route_of(q1, 0.1), v.first_token_s(route_of(q1, 0.1))) for v in views] == [False, True]
    assert route(qos, 0.1, q1, ns) == 1
    assert route(qos, 0.1, req(201, 0.1, 8000, tier="Q3"), ns) == 0   # sorts after the queued Q3 work


def test_qos_spreads_ties_over_idle_replicas_and_may_hold():
    ns = fleet_nodes(4)
    qos = make_router("qos")
    assert sorted(route(qos, 0.0, req(k, 0.0, 500), ns) for k in range(4)) == [0, 1, 2, 3]
    for n in ns:
        queue_on(n, [req(100 * (n.index + 1) + k, 0.0, 1000) for k in range(64)])
    held = make_router("qos", hold_s=1.0, retry_s=0.5)
    late = req(99, 0.1, 1000)
    assert route(held, 0.1, late, ns) is None           # infeasible everywhere: held...
    assert route(held, 1.1, late, ns) is not None       # ...for at most hold_s, then sent where least late


def test_holding_requests_still_finishes_them_all():
    wl = make_workload("azure-code", 60.0, num_requests=600, seed=1)
    res = simulate_cluster(wl, make_fleet("shared:2", wl.tiers, router="qos"),
                           router_options={"hold_s": 0.5, "retry_s": 0.25})
    assert res.num_held > 0
    assert all(r.phase is Phase.DONE for r in res.requests)


def test_a_silo_routes_each_tier_to_its_own_replicas_with_its_chunk():
    wl = make_workload("azure-code", 6.0, num_requests=600, seed=3)
    fleet = make_fleet("silo:2,1,1", wl.tiers)
    assert [(p.name, p.num_replicas, p.policy, p.policy_options["chunk_size"]) for p in fleet.pools] == \
        [("Q1", 2, "edf", 256), ("Q2", 1, "edf", 2048), ("Q3", 1, "edf", 2048)]
    res = simulate_cluster(wl, fleet)
    pool_of = {0: "Q1", 1: "Q1", 2: "Q2", 3: "Q3"}
    assert all(pool_of[k] == r.tier.name for r, k in zip(res.requests, res.replica_of))
    assert [s.tier_requests.keys() <= {s.pool} for s in res.replicas] == [True] * 4
    q1 = [s.num_requests for s in res.replicas[:2]]
    assert abs(q1[0] - q1[1]) <= 1                       # round-robin inside the silo
    with pytest.raises(ValueError, match="no replica serves tier Q2"):
        simulate_cluster(wl, make_fleet("silo:2,0,1", wl.tiers))


def test_blocks_conserved_and_every_token_timed_across_a_fleet_under_kv_pressure():
    wl = make_workload("sharegpt", 6.0, num_requests=500, seed=1)
    res = simulate_cluster(wl, make_fleet("shared:3", wl.tiers, router="qos"), kv_tokens=40_000)
    assert res.num_preemptions > 0
    ends = np.asarray(res.iteration_end_s)
    for r, spec in zip(res.requests, wl.specs):
        assert r.phase is Phase.DONE and r.block_ids == []
        times = token_times(r, ends)          # segments moved onto the concatenated timeline
        assert len(times) == spec.num_output_tokens and np.all(np.diff(times) > 0)
        assert times[0] == r.first_token_s and times[-1] == r.finish_s
    # simulate_cluster itself checks every replica's blocks and that none is unfinished
    summary, _ = summarize(res)
    assert summary.num_requests == 500 and summary.num_iterations == res.num_iterations


def test_fleet_specs():
    assert parse_fleet("shared:10") == ("shared", (10,))
    assert parse_fleet(" silo:7,3,3") == ("silo", (7, 3, 3))
    assert make_fleet("silo:7,3,3", tuple(TIERS.values())).num_replicas == 13
    assert make_fleet("shared:4", tuple(TIERS.values()), router="least-loaded").label == "shared:4 niyama/least-loaded"
    for bad in ("shared", "pool:3", "shared:0", "shared:2,2", "silo:1,x,1", "silo:-1,2,2"):
        with pytest.raises(ValueError):
            parse_fleet(bad)
    with pytest.raises(ValueError, match="one count per tier"):
        make_fleet("silo:3,3", tuple(TIERS.values()))
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random")


def test_smallest_passing_finds_the_threshold_from_any_start():
    def ev(n):
        return Evaluation("shared", n, "x", {"Q1": 5.0 if n < 7 else 0.0}, n >= 7, 0, n, 0.0, 0.0)
    for start in (1, 4, 7, 9, 30):
        answer, points = smallest_passing(ev, start, 64)
        assert answer == 7 and len(points) <= 10
    assert smallest_passing(ev, 2, 6)[0] is None
    assert smallest_passing(ev, 9, 64, min_n=8)[0] == 8            # never below the floor (the bound)
    answer, points = smallest_passing(ev, 7, 64, min_n=7)
    assert answer == 7 and [p.num_replicas for p in points] == [7]


def test_evaluate_pool_sampled_round_robin_matches_the_whole_pool():
    setup = PlanSetup("azure-code", 9.0, duration_s=200, sample_replicas=0)
    wl = setup.workload()
    whole = evaluate_pool(setup, wl, "shared", 2, "round-robin")
    fleet = simulate_cluster(wl, make_fleet("shared:2", wl.tiers, router="round-robin"))
    n = {t.name: sum(r.tier.name == t.name for r in fleet.requests) for t in wl.tiers}
    from niyama.metrics import tier_violations
    assert whole.tier_violation_pct == pytest.approx(tier_violations(fleet)) and whole.simulated_replicas == 2
    assert whole.num_requests == sum(n.values())
    silo = evaluate_pool(dataclasses.replace(setup, sample_replicas=1), wl, "Q1", 3, "round-robin")
    assert set(silo.tier_violation_pct) == {"Q1"} and silo.simulated_replicas == 1


def test_plan_cli_in_process(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--trace", "azure-code", "--qps", "7", "--duration-h", "0.1", "--router", "qos",
                 "--jobs", "1", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "shared (qos)" in text and "silo" in text and "fewer" in text
    plan = json.loads((out / "plan.json").read_text())
    shared, silo = plan["shared"]["replicas"], plan["silo"]["replicas"]
    # each search's answer is the smallest pool that passed: its run passed, and one replica fewer either ran
    # and failed or was below the pool's throughput floor (never searched)
    answers = {(x["pool"], x["router"]): x for x in plan["searches"]}
    for (pool, router), search in answers.items():
        runs = {e["num_replicas"]: e for e in plan["evaluations"] if (e["pool"], e["router"]) == (pool, router)}
        n = search["answer"]
        assert runs[n]["passed"] and runs[n]["worst_pct"] <= 1.0, (pool, router, runs)
        below = runs.get(n - 1)
        assert (below is not None and not below["passed"]) or n - 1 < search["busy_replicas"], (pool, router, runs)
    assert shared == answers[("shared", "qos")]["answer"]
    assert plan["silo"]["counts"] == [answers[(t, "round-robin")]["answer"] for t in ("Q1", "Q2", "Q3")]
    assert silo == sum(plan["silo"]["counts"]) and shared <= silo
    assert plan["saving"] == pytest.approx(1 - shared / silo)
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plan.csv").read_text().count("\n") == len(plan["evaluations"]) + 1


def test_sustainable_answer_raises_each_pool_to_its_throughput_floor():
    from niyama.cluster.planner import Plan, Search
    from niyama.experiments.cluster import sustainable
    searches = [Search("shared", "qos", 10, [], 9.2), Search("Q1", "round-robin", 6, [], 4.4),
                Search("Q2", "round-robin", 3, [], 3.1), Search("Q3", "round-robin", 3, [], 3.0)]
    plan = Plan(PlanSetup("azure-code", 43.0), ["Q1", "Q2", "Q3"], searches[0], None, searches[1:], 1.0)
    s = sustainable(plan)
    assert (s["shared"], s["silo"], s["silo_total"]) == (10, (6, 4, 3), 13)
    assert s["ratio"] == pytest.approx(10 / 13) and plan.saving == pytest.approx(1 - 10 / 12)


def test_cluster_experiment_quick(tmp_path):
    """The --quick path (CI size: a 2-replica load for 6 minutes); tests/cluster/test_experiments.py checks its files."""
    assert main(["experiment", "cluster", "--quick", "--reference-qps", "4.66", "--out", str(tmp_path),
                 "--quiet"]) == 0
    res = json.loads((tmp_path / "cluster" / "results.json").read_text())["results"]
    fleets = [r["fleet"] for r in res["table"]]
    assert fleets[0] == "silo-(2,1,1)" and "shared:4 niyama/round-robin" in fleets
    plan, steady = res["plan"], res["sustainable"]
    assert plan["shared"]["replicas"] <= steady["shared"] and plan["silo"]["replicas"] <= steady["silo_total"]
    counts = {r["replicas"] for r in res["routers"]}
    assert len(res["routers"]) == 2 * len(counts) and set(res["replicas_needed"]) == {"round-robin", "qos"}
    assert all(r["requests_min"] <= r["requests_max"] for r in res["routers"])
