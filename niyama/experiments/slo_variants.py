"""Tighter SLOs (paper §4.4.2): Q1 = 3 s TTFT / 50 ms TBT, Q2 = 6 s / 50 ms,
Q3 = 1000 s TTLT, on Azure Conv: capacity of each policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Context, Report
from .capacity_bars import capacity_report

PAPER = {"edf": 3.7, "niyama": 5.0}


@dataclass
class Params:
    trace: str = "azure-conv"
    policies: tuple = ("fcfs", "edf", "niyama")
    tiers: str = "slo-variants"
    duration_h: float = 4.0


QUICK = {"duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    scenarios = [ctx.scenario(p.trace, pol, p.duration_h, tiers=p.tiers) for pol in p.policies]
    note = ("Paper (§4.4.2, Azure Conv 2024): QoServe 5.0 QPS, EDF 3.7 (x1.35). Our Azure Conv trace is the 2023 one: "
            "compare the ratio.")
    return capacity_report(ctx, scenarios, PAPER, f"Capacity with tiers '{p.tiers}' on {p.trace}", note,
                           "slo_variants", out, baseline="edf")
