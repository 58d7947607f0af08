"""The paper's evaluation as commands: `niyama experiment NAME`.

Each experiment is one module with `Params`, `QUICK` and `run`; this
registry names them in the order of the paper's evaluation section.
"""

from __future__ import annotations

from . import ablation, alpha, chunks, cluster, load_sweep, mixes, overload, prefill_only, slo_variants
from .base import Context, Experiment, Report, run_experiment

EXPERIMENTS = {e.name: e for e in (
    Experiment("load-sweep", "Load sweep (Figs. 10/11)", load_sweep.Params, load_sweep.QUICK, load_sweep.run),
    Experiment("ablation", "Ablation (Table 5)", ablation.Params, ablation.QUICK, ablation.run),
    Experiment("overload", "Transient overload with priority hints (Figs. 12/13)", overload.Params, overload.QUICK,
               overload.run),
    Experiment("mixes", "Workload mixes (Table 6)", mixes.Params, mixes.QUICK, mixes.run),
    Experiment("alpha", "Hybrid priority weight alpha (Fig. 14)", alpha.Params, alpha.QUICK, alpha.run),
    Experiment("slo-variants", "Tighter SLOs (§4.4.2)", slo_variants.Params, slo_variants.QUICK, slo_variants.run),
    Experiment("chunks", "Chunk size per iteration (Fig. 9)", chunks.Params, chunks.QUICK, chunks.run),
    Experiment("prefill-only", "Prefill-only replicas (Fig. 8)", prefill_only.Params, prefill_only.QUICK,
               prefill_only.run),
    Experiment("cluster", "Silos vs a shared pool, and routers (Table 4)", cluster.Params, cluster.QUICK, cluster.run),
)}

__all__ = ["EXPERIMENTS", "Context", "Experiment", "Report", "run_experiment"]
