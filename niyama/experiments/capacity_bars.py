"""Capacity of a few policies on one set-up, as bars beside the paper's
numbers: the shape of the SLO-variants and prefill-only experiments."""

from __future__ import annotations

from pathlib import Path

from .base import Context, Report, md_table, pyplot, save_figure


def capacity_report(ctx: Context, scenarios, paper: dict[str, float], title: str, note: str, stem: str,
                    out: Path, baseline: str | None = None) -> Report:
    """`baseline`: the policy that ratios are taken against (default: the first)."""
    caps = ctx.capacities(scenarios)
    policies = [sc.policy for sc in scenarios]
    base = baseline if baseline in policies else policies[0]
    first = caps[policies.index(base)].capacity_qps
    paper_first = paper.get(base)
    rows = []
    for sc, cap in zip(scenarios, caps):
        ref = paper.get(sc.policy)
        rows.append({"policy": sc.policy, "capacity_qps": cap.capacity_qps,
                     "vs_first": cap.capacity_qps / first if first else float("nan"), "paper_qps": ref,
                     "paper_vs_first": ref / paper_first if ref and paper_first else None})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(rows), 3.6))
    bars = ax.bar(range(len(rows)), [r["capacity_qps"] for r in rows], 0.6, label="ours")
    ax.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center", color="white")
    drawn = False
    for i, r in enumerate(rows):
        if r["paper_qps"] is not None:
            ax.plot([i - 0.3, i + 0.3], [r["paper_qps"]] * 2, color="black", lw=2, label=None if drawn else "paper")
            drawn = True
    ax.set_xticks(range(len(rows)), [r["policy"] for r in rows], fontsize=8)
    ax.set_ylabel("QPS per replica")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = save_figure(fig, out / f"{stem}.png")
    first_name = base
    body = [note, "", md_table(rows, {"policy": "policy", "capacity_qps": "capacity (QPS)", "vs_first":
                                      f"x {first_name}", "paper_qps": "paper QPS", "paper_vs_first":
                                      f"paper x {first_name}"})]
    return Report("\n".join(body), {stem: rows}, [png], {"rows": rows})
