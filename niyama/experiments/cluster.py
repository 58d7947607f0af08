"""Silos against one shared pool (paper Table 4), and routers for the pool.

The paper served Azure Code (2024) at 35 QPS with Llama-3-8B on A100s,
round-robin load balancing: Silo-(7,3,3) (7 replicas for Q1, 3 for Q2, 3
for Q3; Sarathi chunks 256 / 2048 / 2048) met the SLOs with 13 GPUs (0.24%
violated), Silo-(6,2,2) with 10 GPUs violated 60.4%, and a shared pool of
10 niyama replicas violated none: 23% fewer GPUs.

The load is scaled the way the other experiments scale theirs: 35 QPS is
35 / 3.8 = 9.2 times the paper's per-replica QoServe capacity on its trace
(Fig. 7), so here it is 9.2 x niyama's capacity on ours
(`Context.reference_capacity`). Every fleet below is simulated whole
(`niyama.cluster.simulate_cluster`) on the same workload; the planner
(`niyama plan`'s search) finds the smallest shared pool and the best silo
split at that load by the paper's criterion on runs of this length (worst
tier <= 1% violated), and, as a second answer, what stays sustainable: no
pool with fewer replicas than its load over one replica's throughput bound
(`niyama bound`, at the pool's largest step), below which a backlog grows
for as long as the load lasts and only the run's end hides it. Then each
router runs the shared pool at the planner's counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..cluster.fleet import silo_spec
from ..cluster.planner import Plan, PlanSetup, plan_fleet, run_fleet
from ..metrics.summary import summarize
from ..scheduler import policy_options
from ..sim.parallel import run_parallel
from .base import Context, Report, md_table, pyplot, save_figure

PAPER_CAPACITY = 3.8      # QoServe on Azure Code, Fig. 7
PAPER_QPS = 35.0
PAPER = {"silo:7,3,3": (13, 0.24), "silo:6,2,2": (10, 60.4), "shared:10": (10, 0.0)}   # GPUs, % violated
PAPER_SAVING = 1 - 10 / 13


@dataclass
class Params:
    trace: str = "azure-code"
    load: float = PAPER_QPS / PAPER_CAPACITY     # the fleet's load, x niyama's single-replica capacity
    silos: tuple = ("7-3-3", "6-2-2")            # the paper's splits (Q1-Q2-Q3); the planner's best is added
    routers: tuple = ("round-robin", "least-loaded", "qos")
    plan_router: str = "qos"                     # the shared pool's router in the planner
    duration_h: float = 4.0
    reference_duration_h: float = 4.0            # runs of the capacity search the load is scaled to
    sample_replicas: int = 2                     # the planner's round-robin pools: replicas simulated per run


# CI: a small fleet (twice one replica's capacity) for 6 minutes: the code paths, not the paper's numbers
QUICK = {"load": 2.0, "silos": ("2-1-1",), "routers": ("round-robin", "qos"), "duration_h": 0.1,
         "reference_duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.reference_duration_h)
    qps = round(p.load * cap, 2)
    knobs = policy_options("niyama")
    setup = PlanSetup(p.trace, qps, duration_s=p.duration_h * 3600, seed=ctx.seed, profile=ctx.profile,
                      kv_tokens=ctx.kv_tokens, noise=ctx.noise, executor_profile=ctx.executor_profile,
                      policy_options={k: v for k, v in ctx.policy_overrides.items() if k in knobs},
                      router=p.plan_router, sample_replicas=p.sample_replicas, bound_floor=False)
    plan = plan_fleet(setup, ctx.processes, ctx.show_progress)
    steady = sustainable(plan)
    paper_silos = [silo_spec(s.split("-")) for s in p.silos]
    silos = list(dict.fromkeys(paper_silos + [silo_spec(c) for c in (plan.silo_counts, steady["silo"]) if c]))
    shared_n = plan.shared.answer
    rr_n = plan.shared_rr.answer if plan.shared_rr else shared_n
    router_counts = sorted({n for n in (shared_n, rr_n, (shared_n or 2) - 1) if n and n >= 1})
    table_items = [(s, "round-robin") for s in silos] + \
        [(f"shared:{_total(s)}", "round-robin") for s in paper_silos] + \
        ([(f"shared:{shared_n}", p.plan_router)] if shared_n else [])
    router_items = [(f"shared:{n}", r) for n in router_counts for r in p.routers]
    items = list(dict.fromkeys(table_items + router_items))
    done = dict(zip(items, run_parallel(lambda it, tick: _fleet_row(setup, *it, tick), items,
                                         processes=ctx.processes, desc="fleets", show_progress=ctx.show_progress)))
    tiers = plan.tiers
    table = [{**done[it], **_paper(it)} for it in dict.fromkeys(table_items)]
    routers = [done[it] for it in router_items]
    needed = _replicas_needed(routers, p.routers, router_counts, setup.target_pct)
    targets = {t.name: (t.ttft_s if t.interactive else t.ttlt_s) for t in setup.workload().tiers}
    fig = _plot(table, routers, needed, tiers, targets, setup.target_pct, out / "cluster.png")
    body = [f"Load {qps:g} QPS = {p.load:.2f} x niyama's capacity of {cap:.2f} QPS per replica on {p.trace} (the "
            f"paper's {PAPER_QPS:g} QPS over its {PAPER_CAPACITY:g}), {p.duration_h:g} h of Poisson arrivals, equal "
            f"tier shares. Silos: edf (FCFS within a tier), chunk 256 for Q1 and 2048 for Q2/Q3, round-robin inside; "
            "the shared pool: niyama.", "",
            "Paper (Table 4, Azure Code 2024, 35 QPS): Silo-(7,3,3) 13 GPUs, 0.24% violated; Silo-(6,2,2) 10 GPUs, "
            "60.4%; shared 10 GPUs, 0% (23% fewer GPUs).", "",
            "Fleets, each simulated whole (p99: TTFT for Q1, TTLT for Q2/Q3):", "",
            md_table(table, {"fleet": "fleet", "replicas": "GPUs",
                             **{f"{t}_p99_s": f"{t} p99 (s)" for t in tiers},
                             **{f"{t}_violation_pct": f"{t} %" for t in tiers},
                             "violation_pct": "overall %", "backlog_s": "backlog (s)",
                             "paper_replicas": "paper GPUs", "paper_violation_pct": "paper %"}), "",
            _plan_text(plan, steady), "",
            f"Routers on the shared pool (niyama) at {', '.join(map(str, router_counts))} replicas:", "",
            md_table(routers, {"fleet": "fleet", **{f"{t}_violation_pct": f"{t} %" for t in tiers},
                               "worst_pct": "worst tier %", **{f"{t}_p99_s": f"{t} p99 (s)" for t in tiers},
                               "strict_violation_pct": "strict %", "backlog_s": "backlog (s)",
                               "requests_min": "fewest requests/replica", "requests_max": "most"}), "",
            f"Replicas needed (worst tier <= {setup.target_pct:g}%), of the counts run: "
            + ", ".join(f"{r} {_needed_text(n, router_counts)}" for r, n in needed.items()) + "."]
    results = {"reference_capacity_qps": cap, "qps": qps, "plan": plan.to_dict(), "sustainable": steady,
               "table": table, "routers": routers, "replicas_needed": needed, "paper_saving": PAPER_SAVING}
    return Report("\n".join(body), {"cluster": table, "cluster_routers": routers,
                                    "cluster_plan": plan.to_dict()["evaluations"]}, [fig], results)


def _total(spec: str) -> int:
    return sum(int(x) for x in spec.partition(":")[2].split(","))


def _fleet_row(setup: PlanSetup, spec: str, router: str, tick) -> dict:
    res = run_fleet(setup, spec, router)
    s, _ = summarize(res)
    counts = [r.num_requests for r in res.replicas]
    row = {"fleet": res.fleet.label, "spec": spec, "router": router, "replicas": res.fleet.num_replicas,
           "requests": s.num_requests, "violation_pct": s.violation_pct, "strict_violation_pct": s.strict_violation_pct,
           "worst_pct": s.worst_tier_violation_pct}
    for t in s.tiers:
        row[f"{t.name}_violation_pct"] = t.violation_pct
        row[f"{t.name}_p99_s"] = t.ttft_s[2] if t.tbt_target_s is not None else t.ttlt_s[2]
    row.update({"backlog_s": s.backlog_s, "relegated": s.relegated, "preemptions": s.preemptions,
                "utilization": res.utilization, "requests_min": min(counts), "requests_max": max(counts)})
    tick(f"{res.fleet.label}: worst {s.worst_tier_violation_pct:.2f}%")
    return row


def _paper(item) -> dict:
    """The paper's GPUs and violations for a fleet it ran (all of its fleets were round-robin)."""
    spec, router = item
    gpus, pct = PAPER.get(spec, (None, None)) if router == "round-robin" else (None, None)
    return {"paper_replicas": gpus, "paper_violation_pct": pct}


def _needed_text(n: int | None, counts: list[int]) -> str:
    if n is None:
        return f"> {max(counts)}"
    return f"<= {n}" if n == min(counts) else str(n)


def _replicas_needed(rows: list[dict], routers, counts, target: float) -> dict:
    """Per router, the fewest replicas run that passed (None if none did; more replicas never hurt here)."""
    out = {}
    for r in routers:
        ok = [row["replicas"] for row in rows if row["router"] == r and row["worst_pct"] <= target]
        out[r] = min(ok) if ok else None
    return out


def sustainable(plan: Plan) -> dict:
    """The planner's answers raised to each pool's throughput floor (its load over one replica's bound, rounded
    up): more replicas never hurt, so these pass too, and no pool's backlog grows without end."""
    def up(search) -> int | None:
        return None if search.answer is None else max(search.answer, math.ceil(search.bound - 1e-9))
    silo = tuple(up(s) for s in plan.silos)
    silo = None if any(c is None for c in silo) else silo
    shared = up(plan.shared)
    return {"shared": shared, "silo": silo, "silo_total": sum(silo) if silo else None,
            "ratio": shared / sum(silo) if shared and silo else None,
            "busy": {s.pool: s.bound for s in [plan.shared] + plan.silos}}


def _plan_text(plan: Plan, steady: dict) -> str:
    rr = f"; round-robin needs {plan.shared_rr.answer}" if plan.shared_rr else ""
    if plan.saving is None or steady["ratio"] is None:
        return "Planner: no answer within its limit."
    silo = ",".join(map(str, plan.silo_counts))
    busy = ", ".join(f"{k} {v:.2f}" for k, v in steady["busy"].items())
    return (f"Planner (`niyama plan --no-bound-floor`, runs of the same length): shared pool {plan.shared.answer} "
            f"replicas with the {plan.shared.router} router{rr}; best silo split ({silo}) = {plan.silo_total}. The "
            f"shared pool needs {plan.shared.answer / plan.silo_total:.2f}x the silos' GPUs ({100 * plan.saving:.0f}% "
            f"fewer); the paper: 10 vs 13, 0.77x ({100 * PAPER_SAVING:.0f}% fewer). Searched in {plan.seconds:.0f} s "
            f"({sum(len(s.points) for s in plan.searches)} runs).\n\n"
            f"Sustainable (`niyama plan`'s default): each pool keeps {busy} replicas busy at their throughput bound "
            f"(shared at 2552-token steps, Q1 silo at its 256-token chunk, Q2/Q3 at 2048); a pool with fewer is "
            f"overloaded and passes a finite run only because its backlog has not yet outgrown the TTLT. Raised to "
            f"those floors: shared {steady['shared']} vs silo ({','.join(map(str, steady['silo']))}) = "
            f"{steady['silo_total']}, {steady['ratio']:.2f}x ({100 * (1 - steady['ratio']):.0f}% fewer).")


def _plot(table: list[dict], routers: list[dict], needed: dict, tiers: list[str], targets: dict, target: float,
          path: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.3, 1]})
    width = 0.8 / len(tiers)
    floor = 1e-3
    for j, t in enumerate(tiers):
        xs = [i + (j - (len(tiers) - 1) / 2) * width for i in range(len(table))]
        left.bar(xs, [max(r[f"{t}_violation_pct"], floor) for r in table], width * 0.92, label=t)
    for i, r in enumerate(table):
        if r.get("paper_violation_pct") is not None:
            left.plot([i - 0.4, i + 0.4], [max(r["paper_violation_pct"], floor)] * 2, color="black", lw=2,
                      label="paper (overall)" if i == 0 else None)
    left.axhline(target, color="black", ls=":", lw=1)
    left.set_yscale("log")
    left.set_xticks(range(len(table)), [f"{r['fleet']}\n{r['replicas']} GPUs".replace(" niyama/", "\n")
                                        for r in table], fontsize=7)
    left.set_ylabel(f"violated % (0 drawn at {floor:g})")
    left.set_title("silos vs the shared pool, same workload", fontsize=10)
    left.legend(fontsize=7, ncols=2)
    groups = [(n, r) for n in sorted({row["replicas"] for row in routers}) for r in dict.fromkeys(
        row["router"] for row in routers)]
    by = {(row["replicas"], row["router"]): row for row in routers}
    for j, t in enumerate(tiers):
        xs = [i + (j - (len(tiers) - 1) / 2) * width for i in range(len(groups))]
        right.bar(xs, [by[g][f"{t}_p99_s"] / targets[t] for g in groups], width * 0.92, label=f"{t} p99 / target")
    for i, g in enumerate(groups):
        top = max(by[g][f"{t}_p99_s"] / targets[t] for t in tiers)
        right.text(i, top * 1.3, f"{by[g]['worst_pct']:.2g}%", ha="center", fontsize=7)
    right.axhline(1.0, color="black", ls=":", lw=1)
    right.set_yscale("log")
    right.set_xticks(range(len(groups)), [f"{r}\n{n} replicas" for n, r in groups], fontsize=7)
    right.set_ylim(top=right.get_ylim()[1] * 3)
    right.set_ylabel("p99 latency / tier target")
    right.set_title("routers on the shared pool; above the bars: worst tier violated %\nreplicas needed: "
                    + ", ".join(f"{r} {n or '-'}" for r, n in needed.items()), fontsize=9)
    right.legend(fontsize=7)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)

