"""Prefill-only replicas (paper Fig. 8), as in a prefill/decode-disaggregated
deployment: every request emits one token (its first), chunks are a fixed
8K tokens, and niyama runs without dynamic chunking (there are no decodes
whose slack could size a chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Context, Report
from .capacity_bars import capacity_report

PAPER = {"fcfs": 6.0, "edf": 6.6, "niyama-no-dc": 7.3}


@dataclass
class Params:
    trace: str = "azure-conv"
    policies: tuple = ("fcfs", "edf", "niyama-no-dc")
    chunk_size: int = 8192
    duration_h: float = 4.0


QUICK = {"duration_h": 0.5}


def run(p: Params, ctx: Context, out: Path) -> Report:
    scenarios = [ctx.scenario(p.trace, pol, p.duration_h, policy_opts={"chunk_size": p.chunk_size}, output_tokens=1)
                 for pol in p.policies]
    note = (f"Every request emits exactly one token; fixed {p.chunk_size}-token chunks. Paper (Fig. 8, Azure Conv "
            "2024): FCFS 6.0, EDF 6.6, QoServe without dynamic chunking 7.3 QPS per prefill replica. Our Azure Conv "
            "trace is the 2023 one: compare the ratios.")
    return capacity_report(ctx, scenarios, PAPER, f"Prefill-only replica on {p.trace}, {p.chunk_size}-token chunks",
                           note, "prefill_only", out)
