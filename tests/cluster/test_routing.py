"""The routers of niyama/routing.py: the simulated fleet's path (`Router.choose` over views of its replicas) and
Ray Serve's (`Router.rank` over the replicas' reports in their dict form, plus what was sent since) make the same
choices from the same reports; and each rule's choice on hand-made reports. No Ray needed."""

import random
import time

import pytest

from niyama.cluster import make_fleet, simulate_cluster
from niyama.cluster.sim import Node, NodeLoad, route, route_of
from niyama.messages import LoadReport, Route
from niyama.request import Phase
from niyama.routing import NO_REPORT, ROUTERS, Sent, View, as_report, counted, make_router
from niyama.workload import make_workload

from helpers import TIERS, fleet_nodes, queue_on, req, start_decode

OPTIONS = [("round-robin", {}), ("least-loaded", {}), ("qos", {}), ("qos", {"prefer": "slack"}),
           ("qos", {"comfort": 0.2}), ("qos", {"hold_s": 1.0, "retry_s": 0.5})]


def report(**kw) -> LoadReport:
    base = dict(time=time.time(), prefill_tokens_per_s=1000.0, ahead_s={"Q1": 0.0, "Q3": 0.0}, work_tokens=0,
                requests=0, kv_free_tokens=100_000, decodes_late=False)
    return LoadReport(**{**base, **kw})


def route_for(tier="Q1", prompt=100, max_tokens=50, first_token_s=6.0, age_s=0.0) -> Route:
    return Route(tier, TIERS[tier].interactive, prompt, max_tokens, first_token_s, time.time(), age_s)


def first(name: str, reports: list, r: Route, **options):
    """A fresh rule's first choice."""
    return make_router(name, **options).rank([View(x) for x in reports], r)[0]


# --- the two paths agree ------------------------------------------------------------------------------------------
def ray_path(rule, reports: list[LoadReport], sent: list[tuple], r: Route):
    """As `ray_serve.NiyamaRouter` does: each report as Ray Serve carries it (a dict), the sends since, all ranked."""
    order = rule.rank([View.of(x._asdict(), s) for x, s in zip(reports, sent)], r)
    return None if order is None else order[0]


def random_report(rng: random.Random) -> LoadReport:
    return report(prefill_tokens_per_s=rng.choice([800.0, 1000.0, 1003.0]),
                  ahead_s={"Q1": rng.choice([0.0, 0.02, 1.0, 3.5, 8.0]), "Q3": rng.choice([0.0, 30.0, 900.0])},
                  work_tokens=rng.choice([0, 0, 500, 5000, 20_000]), kv_free_tokens=rng.choice([100, 100_000]),
                  decodes_late=rng.random() < 0.3)


@pytest.mark.parametrize("name,options", OPTIONS)
def test_the_fleet_and_ray_serve_choose_alike_from_the_same_reports(name, options):
    rng = random.Random(7)
    sim_rule, ray_rule = make_router(name, **options), make_router(name, **options)
    held = 0
    for _ in range(400):
        n = rng.randint(1, 5)
        reports = [random_report(rng) for _ in range(n)]
        sent = [tuple(route_for(prompt=rng.choice([100, 3000])) for _ in range(rng.choice([0, 0, 2]))) for _ in range(n)]
        tier = rng.choice(["Q1", "Q3"])
        r = route_for(tier, rng.choice([10, 2000]), first_token_s=6.0 if tier == "Q1" else 1700.0,
                      age_s=rng.choice([0.0, 0.7]))
        views = [View(x, Sent(s)) for x, s in zip(reports, sent)]
        choice = sim_rule.choose(views, r)
        assert choice == ray_path(ray_rule, reports, sent, r)
        held += choice is None
    assert (held > 0) == (options.get("hold_s", 0) > 0)


def late_decode(node, rid: int) -> None:
    """A Q1 decode whose next token was due long ago."""
    replica = node.replica
    r = start_decode(replica.decodes, replica.kv, req(rid, -10.0, 100, 50), first_token_s=0.0)
    node.output_tokens_left += r.max_output_tokens - r.num_output_tokens


def test_simulated_replicas_route_alike_on_both_paths():
    """The fleet's own routing (`cluster.sim.route`: lazy views of its replicas) against Ray Serve's path fed the
    load reports those replicas would send (`NodeLoad.report`)."""
    ns = fleet_nodes(3, kv_tokens=40_000)
    queue_on(ns[0], [req(k, 0.0, 1000) for k in range(50)])              # Q1 backlog: ~6 s ahead of a new Q1
    queue_on(ns[1], [req(100 + k, 0.0, 3000, tier="Q3") for k in range(5)])
    late_decode(ns[2], 200)                                           # idle but for one late decode
    now = 1.0
    for name, options in OPTIONS:
        sim_rule, ray_rule = make_router(name, **options), make_router(name, **options)
        for k, (tier, prompt) in enumerate([("Q1", 100), ("Q3", 100), ("Q1", 4000), ("Q2", 500)] * 2):
            r = req(300 + k, 0.5, prompt, tier=tier)
            reports = [NodeLoad(n, now, r).report() for n in ns]
            assert route(sim_rule, now, r, ns) == ray_path(ray_rule, reports, [()] * 3, route_of(r, now)), (name, k)
    qos = make_router("qos")
    assert route(qos, now, req(400, 0.5, 100), ns) == 1                       # Q1: not behind Q1 work, not late
    assert route(qos, now, req(401, 0.5, 100, tier="Q3"), ns) == 2            # Q3: the least work


def test_the_fleets_work_count_is_its_replicas_outstanding_tokens(monkeypatch):
    """`NodeLoad.work_tokens` (kept step by step) is the engine's `work_tokens` sum over the replica's requests,
    through preemptions (their prefill again) and prefills that end in a first token."""
    wl = make_workload("sharegpt", 6.0, num_requests=300, seed=1)
    checked = []
    on_step = Node.on_step

    def checking(node, plan, result, end):
        on_step(node, plan, result, end)
        replica, live = node.replica, 0
        for r in replica.live_requests():
            made = (replica.decodes.num_output_at(r, replica.iteration - 1) if r.phase is Phase.DECODE
                    else r.num_output_tokens)
            live += r.num_remaining_prefill + r.max_output_tokens - made
        assert NodeLoad(node, end, None).work_tokens == live
        checked.append(bool(plan.preempted))

    monkeypatch.setattr(Node, "on_step", checking)
    res = simulate_cluster(wl, make_fleet("shared:2", wl.tiers, router="least-loaded"), kv_tokens=30_000)
    assert res.num_preemptions > 0 and any(checked) and len(checked) == res.num_iterations


# --- each rule on hand-made reports -----------------------------------------------------------------------------
def test_ties_rotate_so_an_idle_fleet_takes_turns():
    idle = [report(), report(prefill_tokens_per_s=1001.0), report()]      # predictions a hair apart: a tie
    for name in ROUTERS:
        rule = make_router(name)
        assert [rule.choose([View(x) for x in idle], route_for()) for _ in range(4)] == [0, 1, 2, 0], name
    rule = make_router("qos")
    assert rule.rank([View(NO_REPORT)] * 2, None) == [0, 1] and rule.turn == 0    # not a generation: no turn
    assert make_router("round-robin").rank([View(report(work_tokens=9999)), View(report())], route_for()) == [0, 1]


def test_least_loaded_picks_less_work_reported_or_sent_since():
    reports = [report(work_tokens=500), report(work_tokens=300)]
    assert first("least-loaded", reports, route_for()) == 1
    sent = [(), (route_for(prompt=400, max_tokens=100),)]                 # 300 + 500 sent since its report
    assert make_router("least-loaded").rank([View.of(x, s) for x, s in zip(reports, sent)], route_for()) == [0, 1]


def test_qos_sends_each_tier_where_its_own_queue_is_short():
    # 0: a long batch backlog, which Q1 requests overtake; 1: a Q1 backlog of 5 s (< 50% of a 6 s TTFT left)
    reports = [report(ahead_s={"Q1": 0.2, "Q3": 60.0}, work_tokens=50_000),
               report(ahead_s={"Q1": 5.0, "Q3": 5.0}, work_tokens=5_000)]
    assert first("qos", reports, route_for("Q1")) == 0
    assert first("least-loaded", reports, route_for("Q1")) == 1
    assert first("qos", reports, route_for("Q3", first_token_s=1700.0)) == 1       # both comfortable: less work
    assert first("qos", reports, route_for("Q1"), prefer="slack") == 0


def test_qos_avoids_late_decodes_for_an_interactive_request_only():
    reports = [report(work_tokens=100, decodes_late=True), report(work_tokens=5000)]
    assert first("qos", reports, route_for("Q1")) == 1
    assert first("qos", reports, route_for("Q3", first_token_s=1700.0)) == 0
    assert first("least-loaded", reports, route_for("Q1")) == 0


def test_qos_falls_back_to_the_earliest_first_token():
    tight = route_for("Q1", prompt=2000, first_token_s=1.0)             # 2 s of prefill: comfortable nowhere
    reports = [report(ahead_s={"Q1": 3.0}), report(ahead_s={"Q1": 1.5}), report(kv_free_tokens=1000)]
    assert make_router("qos").rank([View(x) for x in reports], tight) == [1, 0, 2]   # no KV room for it: last
    # within 50 ms of the soonest counts as the soonest: less work first
    reports = [report(ahead_s={"Q1": 1.5}, work_tokens=900), report(ahead_s={"Q1": 1.53}, work_tokens=100)]
    assert first("qos", reports, tight) == 1 and first("qos", reports, tight, tie_s=0.0) == 0
    # prompt tokens sent since the last report wait ahead too; a report made after a send counts it
    sent = [(), (route_for(prompt=5000),)]
    assert make_router("qos").rank([View.of(x, s) for x, s in zip(reports, sent)], tight)[0] == 0
    assert counted(route_for(), report(time=time.time() + 1)) and not counted(route_for(), report())


def test_qos_may_hold_a_request_for_a_while():
    busy = [report(ahead_s={"Q1": 20.0})] * 2
    held = make_router("qos", hold_s=1.0, retry_s=0.5)
    assert held.choose([View(x) for x in busy], route_for(age_s=0.0)) is None       # late everywhere: held...
    assert held.choose([View(x) for x in busy], route_for(age_s=0.6)) is not None   # ...for at most hold_s
    assert make_router("qos").choose([View(x) for x in busy], route_for()) is not None


def test_reports_in_either_form_and_unknown_rules():
    r = report()
    legacy = {k: v for k, v in r._asdict().items() if k != "decodes_late"}       # an engine before decodes_late
    assert as_report(r) == as_report(r._asdict()) == as_report(legacy) == r
    assert as_report(None) == as_report({}) == NO_REPORT and View.of(None).fits(route_for(max_tokens=10**9))
    assert as_report(report(prefill_tokens_per_s=0.0)).prefill_tokens_per_s > 0
    assert View(report(ahead_s={"Q1": 1.0, "Q3": 7.0})).first_token_s(route_for("Q1")) == pytest.approx(1.1)
    custom = Route("custom", True, 100, 50, 6.0, time.time())              # explicit targets: the most any waits
    assert View(report(ahead_s={"Q1": 1.0, "Q3": 7.0})).first_token_s(custom) == pytest.approx(7.1)
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random")
    with pytest.raises(ValueError, match="prefer"):
        make_router("qos", prefer="fast")
