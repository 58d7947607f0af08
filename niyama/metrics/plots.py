"""Pictures made from result records (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .paper import FIG7_GOODPUT  # noqa: E402


def goodput_bars(rows: list[dict], path: "str | Path", title: str = "Per-replica goodput") -> Path:
    """Grouped bars like the paper's Fig. 7: one group per trace, one bar per policy.
    `rows`: dicts with trace, policy, capacity_qps (and optionally sustainable_qps).
    The paper's values, where it has one, are drawn as black ticks."""
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["trace"], r["policy"]): r for r in rows}
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(traces), 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paper_drawn = False
    for j, pol in enumerate(policies):
        xs = [i + (j - (len(policies) - 1) / 2) * width for i in range(len(traces))]
        vals = [by[(t, pol)]["capacity_qps"] if (t, pol) in by else 0 for t in traces]
        bars = ax.bar(xs, vals, width * 0.92, label=pol, color=colors[j % len(colors)])
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        for x, t in zip(xs, traces):
            ref = FIG7_GOODPUT.get(t, {}).get(pol)
            if ref is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [ref, ref], color="black", lw=2,
                        label=None if paper_drawn else "paper Fig. 7")
                paper_drawn = True
    ax.set_xticks(range(len(traces)), traces)
    ax.set_ylabel("goodput (QPS per replica)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, "paper's Azure bars used the 2024 traces (ours: 2023), compare those by ratio",
             fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
