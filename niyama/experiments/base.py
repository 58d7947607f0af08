"""What every experiment shares.

An experiment is a function `run(params, ctx, out) -> Report` plus a
dataclass of its parameters (full-size defaults) and the changes `--quick`
makes. The `Context` carries what is common to all of them (seed, replica
options, policy knob overrides, how many processes) and runs simulations
and capacity searches in parallel with a progress bar. `run_experiment`
writes the report: one CSV per table, `summary.md`, `results.json`, and the
experiment's PNGs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..metrics.summary import RunSummary, summarize
from ..options import parse_assignments
from ..predictor import DEFAULT_PROFILE
from ..scheduler import policy_options
from ..sim.capacity_study import CapacityJob, CapacityResult, run_capacity_jobs
from ..sim.parallel import run_parallel
from ..sim.run import DEFAULT_KV_TOKENS
from ..sim.scenario import Scenario


@dataclass
class Run:
    """One simulated run, reduced to what experiments read (picklable, no Request objects)."""
    scenario: Scenario
    qps: float | None
    summary: RunSummary
    records: dict[str, np.ndarray]    # per request, see metrics.records.request_records


@dataclass
class Report:
    body: str                                                 # markdown: tables and the paper's numbers
    tables: dict[str, list[dict]] = field(default_factory=dict)   # CSV file stem -> rows
    figures: list[Path] = field(default_factory=list)
    results: dict = field(default_factory=dict)               # key numbers, machine-readable


@dataclass
class Context:
    root: Path                                   # each experiment writes into root / its name
    quick: bool = False
    seed: int = 0
    profile: str = DEFAULT_PROFILE
    kv_tokens: int = DEFAULT_KV_TOKENS
    prefix_caching: bool = True
    noise: float = 0.0
    executor_profile: str | None = None          # how long batches really take (default: `profile`)
    online_correction: bool = False              # the scheduler rescales its profile by the times it sees
    policy_overrides: dict = field(default_factory=dict)   # --opt: applied to every policy with the knob
    reference_qps: float | None = None           # skip the reference capacity search
    processes: int | None = None
    show_progress: bool = True

    def scenario(self, trace: str, policy: str, duration_h: float, policy_opts: dict | None = None,
                 **workload_options) -> Scenario:
        """The experiment's own `policy_opts` (its swept knob) win over --opt."""
        knobs = policy_options(policy)
        opts = {k: v for k, v in self.policy_overrides.items() if k in knobs}
        opts.update(policy_opts or {})
        return Scenario(trace, policy, profile=self.profile, kv_tokens=self.kv_tokens,
                        prefix_caching=self.prefix_caching, noise=self.noise,
                        seed=self.seed, duration_s=duration_h * 3600.0,
                        workload_options={k: v for k, v in workload_options.items() if v is not None},
                        policy_options=opts, executor_profile=self.executor_profile,
                        online_correction=self.online_correction)

    def run_points(self, runs: list[tuple[Scenario, float | None]], desc: str = "simulating") -> list[Run]:
        """Simulate each (scenario, qps), in parallel; summaries and per-request records come back."""
        def one(item, tick) -> Run:
            sc, qps = item
            summary, records = summarize(sc.simulate(qps))
            tick(f"{sc.policy}{'' if qps is None else f' {qps:g} QPS'} -> {summary.violation_pct:.1f}% violated")
            return Run(sc, qps, summary, records)
        return run_parallel(one, runs, processes=self.processes, desc=desc, show_progress=self.show_progress)

    def capacities(self, scenarios: list[Scenario], sustainable: bool = False) -> list[CapacityResult]:
        jobs = [CapacityJob(sc, sustainable=sustainable) for sc in scenarios]
        return run_capacity_jobs(jobs, self.processes, self.show_progress)

    def reference_capacity(self, trace: str, duration_h: float) -> float:
        """niyama's capacity on `trace` (default tiers): experiments scale their load levels to it,
        the way the paper's loads relate to its own capacity. Searched once, then cached in
        `root/reference_capacity.json`; `--reference-qps` skips the search."""
        if self.reference_qps:
            return self.reference_qps
        sc = self.scenario(trace, "niyama", duration_h)
        key = json.dumps(dataclasses.asdict(sc), sort_keys=True)
        path = self.root / "reference_capacity.json"
        cache = json.loads(path.read_text()) if path.exists() else {}
        if key not in cache:
            cache[key] = self.capacities([sc])[0].capacity_qps
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        return cache[key]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    params: type                                # dataclass of knobs, full-size defaults
    quick: dict                                 # what --quick changes
    run: Callable[[Any, Context, Path], Report]

    def make_params(self, quick: bool, overrides: list[str] | None = None):
        base = self.params(**(self.quick if quick else {}))
        changes = parse_assignments(overrides or [], dataclasses.asdict(base), f"experiment {self.name!r}", "--set")
        return dataclasses.replace(base, **changes)


def run_experiment(exp: Experiment, ctx: Context, overrides: list[str] | None = None, command: str = "") -> Report:
    params = exp.make_params(ctx.quick, overrides)
    out = ctx.root / exp.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = exp.run(params, ctx, out)
    seconds = time.time() - t0
    for stem, rows in report.tables.items():
        write_csv(rows, out / f"{stem}.csv")
    meta = {"experiment": exp.name, "quick": ctx.quick, "seconds": round(seconds, 1),
            "params": dataclasses.asdict(params), "seed": ctx.seed, "profile": ctx.profile,
            "kv_tokens": ctx.kv_tokens, "noise": ctx.noise, "policy_overrides": ctx.policy_overrides}
    (out / "results.json").write_text(json.dumps({**meta, "results": report.results}, indent=1, default=_jsonable))
    files = [f"{stem}.csv" for stem in report.tables] + [p.name for p in report.figures]
    settings = ", ".join(f"{k}={_show(v)}" for k, v in dataclasses.asdict(params).items())
    md = [f"# {exp.title}", "",
          f"`{command or 'niyama experiment ' + exp.name}` ({'quick' if ctx.quick else 'full'} size, "
          f"{seconds:.0f} s; seed {ctx.seed}, profile {ctx.profile}, KV {ctx.kv_tokens} tokens, noise {ctx.noise:g})",
          "", f"Parameters: {settings}", ""]
    if ctx.policy_overrides:
        md += [f"Policy overrides (--opt): {ctx.policy_overrides}", ""]
    md += [report.body.strip(), "", "Files: " + ", ".join(files + ["results.json"]), ""]
    md += [f"![{p.stem}]({p.name})" for p in report.figures]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return report


# --- writing helpers ---------------------------------------------------------

def write_csv(rows: list[dict], path: Path) -> Path:
    names = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def md_table(rows: list[dict], columns: dict[str, str]) -> str:
    """Markdown table of `rows`; `columns`: key -> header. Floats get 3 significant digits."""
    def cell(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot, headless (imported only when a picture is drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tier_metric(tier) -> tuple[str, str, float]:
    """The latency a tier's target is about: (records column, label, target seconds)."""
    if tier.interactive:
        return "ttft_s", f"{tier.name} TTFT", tier.ttft_s
    return "ttlt_s", f"{tier.name} TTLT", tier.ttlt_s


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
