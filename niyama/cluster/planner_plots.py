"""The planner's picture: replicas per answer, and each search's runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .planner import Plan  # noqa: E402


def plan_chart(plan: Plan, path: "str | Path") -> Path:
    """Left: replicas of the shared pool(s) and of the silo split, stacked by tier. Right: worst-tier violations
    of every run against its replica count, one line per search, and the target."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shared = [plan.shared] + ([plan.shared_rr] if plan.shared_rr else [])
    labels = [f"shared\n{s.router}" for s in shared] + ["silo"]
    for i, s in enumerate(shared):
        if s.answer:
            bar = left.bar(i, s.answer, 0.6, color="0.45")
            left.bar_label(bar, fmt="%d", padding=2)
    bottom = 0
    for j, s in enumerate(plan.silos):
        if s.answer:
            left.bar(len(shared), s.answer, 0.6, bottom=bottom, color=colors[j % len(colors)], label=f"{s.pool} silo")
            left.text(len(shared), bottom + s.answer / 2, str(s.answer), ha="center", va="center", fontsize=8)
            bottom += s.answer
    if bottom:
        left.text(len(shared), bottom, f"{bottom}", ha="center", va="bottom")
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("replicas (GPUs)")
    saving = "" if plan.saving is None else f": shared saves {100 * plan.saving:.0f}%"
    left.set_title(f"{plan.setup.trace} at {plan.setup.qps:g} QPS{saving}", fontsize=10)
    left.legend(fontsize=8, loc="upper left")
    left.set_ylim(0, max(bottom, *(s.answer or 0 for s in shared), 1) * 1.25)
    silo_color = {s.pool: colors[j % len(colors)] for j, s in enumerate(plan.silos)}
    for k, s in enumerate(plan.searches):
        pts = sorted(s.points, key=lambda p: p.num_replicas)
        if not pts:
            continue
        shared_search = s.pool == "shared"
        right.plot([p.num_replicas for p in pts], [max(p.worst_pct, 1e-3) for p in pts], marker="o",
                   color=("0.2", "0.6")[min(k, 1)] if shared_search else silo_color[s.pool],
                   ls="-" if shared_search else "--", label=f"shared, {s.router}" if shared_search else f"{s.pool} silo")
    right.axhline(plan.setup.target_pct, color="black", ls=":", lw=1, label=f"{plan.setup.target_pct:g}% target")
    right.set_yscale("log")
    right.set_xlabel("replicas in the pool")
    right.set_ylabel("worst tier violated % (0 drawn at 0.001)")
    right.set_title("every run of the searches", fontsize=10)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
