"""Transient overload with priority hints (paper Figs. 12/13).

The load alternates between a low and a high level every 15 minutes for 4
hours; 20% of each tier's requests carry the `low` priority hint. The two
levels are fractions of niyama's capacity on the trace, the way the paper's
2.0 and 5.0 QPS relate to its QoServe capacity of 3.8 QPS on Azure Code
(Fig. 7). niyama relegates `low` requests first;
`niyama-no-priority` is the same policy blind to the hint; `niyama+reject`
is niyama with admission control in every tier (`on_infeasible = reject`):
a request whose first-token deadline is predicted infeasible at arrival is
refused instead of relegated. Its violation % is over the admitted requests;
`on time %` compares every policy over all requests.

Relegated requests wait behind every other request, so they get their first
token only when nothing else waits: late in a low phase, or after arrivals
stop. The picture rings the windows whose p99 they set, and the summary says
when they started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Context, Report, md_table, pyplot, save_figure, tier_metric

PAPER_CAPACITY = 3.8      # QoServe on Azure Code, Fig. 7; the diurnal levels were 2.0 and 5.0 QPS
PAPER = {"fcfs": 81.9, "edf": 84.1, "niyama": 8.64}   # % violated overall; niyama: 0% of important
LIFT = 1.5                # a window's p99 is "set by relegated requests" above LIFT x that of the rest
LEVELS = ("important", "low")


@dataclass
class Params:
    trace: str = "azure-code"
    policies: tuple = ("fcfs", "edf", "niyama-no-priority", "niyama", "niyama+reject")   # +reject: admission
    low_load: float = 2.0 / PAPER_CAPACITY      # x niyama's capacity on the trace
    high_load: float = 5.0 / PAPER_CAPACITY
    period_min: float = 15.0
    duration_h: float = 4.0
    low_priority: float = 0.2
    window_s: float = 60.0


QUICK = {"duration_h": 1.0}


def run(p: Params, ctx: Context, out: Path) -> Report:
    cap = ctx.reference_capacity(p.trace, p.duration_h)
    lo, hi = round(p.low_load * cap, 3), round(p.high_load * cap, 3)
    scenarios = [ctx.scenario(p.trace, pol.partition("+")[0], p.duration_h, arrival="diurnal",
                              diurnal_qps=(lo, hi), diurnal_period_s=p.period_min * 60,
                              low_priority_fraction=p.low_priority, on_infeasible=pol.partition("+")[2] or None)
                 for pol in p.policies]
    runs = ctx.run_points([(sc, None) for sc in scenarios], desc="diurnal overload")
    tiers = scenarios[0].workload(None).tiers
    rows, series, spikes = [], [], []
    for pol, run in zip(p.policies, runs):
        rec, s = run.records, run.summary
        important = rec["priority"] == "important"
        releg = rec["relegated"]
        first_token = (rec["arrival_s"] + rec["ttft_s"])[releg]
        admitted = ~rec["rejected"]
        row = {"policy": pol, "requests": s.num_requests, "violation_pct": s.violation_pct,
               "rejected_pct": s.rejected_pct, "on_time_pct": 100.0 * s.num_on_time / s.num_requests,
               "important_violation_pct": _pct(rec["violated"][important & admitted]),
               "low_violation_pct": _pct(rec["violated"][~important & admitted]),
               **{f"{t.name}_violation_pct": ts.violation_pct for t, ts in zip(tiers, s.tiers)},
               "strict_violation_pct": s.strict_violation_pct,
               "relegated": int(releg.sum()), "relegated_important": int((releg & important).sum()),
               "relegated_completed": int(np.isfinite(rec["ttlt_s"][releg]).sum()),
               "max_relegated_ttft_s": float(rec["ttft_s"][releg].max()) if releg.any() else None,
               "max_relegated_ttlt_s": float(rec["ttlt_s"][releg].max()) if releg.any() else None,
               "relegated_first_token_from_s": float(first_token.min()) if releg.any() else None,
               "relegated_first_token_to_s": float(first_token.max()) if releg.any() else None,
               "relegated_after_last_arrival": int((first_token > rec["arrival_s"].max()).sum()),
               "last_arrival_s": float(rec["arrival_s"].max()),
               "backlog_s": s.backlog_s, "paper_violation_pct": PAPER.get(pol)}
        rows.append(row)
        windows = _windows(pol, rec, tiers, p.window_s)
        series += windows
        spikes += _last_window_spikes(pol, rec, windows[-1], tiers)
    fig = _plot(series, spikes, p, tiers, lo, hi, out / "overload.png")
    body = [f"Load alternates {lo:g} / {hi:g} QPS every {p.period_min:g} min ({p.low_load:.2f} / {p.high_load:.2f} "
            f"x niyama's capacity of {cap:.2f} QPS on {p.trace}; the paper ran 2.0 / 5.0 QPS against 3.8), "
            f"{100 * p.low_priority:g}% of each tier `low`.", "",
            "Paper (Figs. 12/13): QoServe 8.64% violated overall and 0% of important requests; FCFS 81.9%, "
            "EDF 84.1%.", "",
            md_table(rows, {"policy": "policy", "violation_pct": "overall %", "important_violation_pct": "important %",
                            "low_violation_pct": "low %", **{f"{t.name}_violation_pct": f"{t.name} %" for t in tiers},
                            "rejected_pct": "rejected %", "on_time_pct": "on time %",
                            "paper_violation_pct": "paper overall %", "relegated": "relegated",
                            "relegated_important": "of them important", "max_relegated_ttlt_s":
                            "longest relegated TTLT (s)", "backlog_s": "backlog (s)"}), "",
            "Every relegated request completed: " + ", ".join(
                f"{r['policy']} {r['relegated_completed']}/{r['relegated']}" for r in rows) + ".",
            _admission_note(rows),
            f"The picture shows each tier's p99 latency in {p.window_s:g} s windows of arrival time; a ring marks "
            f"a window whose p99 is over {LIFT:g} x that of its non-relegated requests.", "",
            _relegation_note(rows, spikes, p.window_s)]
    results = {"reference_capacity_qps": cap, "low_qps": lo, "high_qps": hi, "rows": rows,
               "last_window_spikes": spikes}
    return Report("\n".join(body), {"overload": rows, "overload_windows": series}, [fig], results)


def _admission_note(rows: list[dict]) -> str:
    """What refusing infeasible requests at arrival did, next to the same policy relegating them."""
    by = {r["policy"]: r for r in rows}
    notes = []
    for name, r in by.items():
        base = by.get(name.partition("+")[0])
        if "+" not in name or base is None:
            continue
        notes.append(f"With admission control ({name}) {r['rejected_pct']:.2f}% of requests were refused at arrival "
                     f"(a 429 on a server); of the admitted ones {r['violation_pct']:.2f}% missed their target "
                     f"({r['important_violation_pct']:.2f}% of important), against {base['violation_pct']:.2f}% "
                     f"({base['important_violation_pct']:.2f}%) when {base['policy']} accepts and relegates them; "
                     f"on time overall {r['on_time_pct']:.2f}% vs {base['on_time_pct']:.2f}%.")
    return " ".join(notes)


def _pct(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean()) if len(mask) else 0.0


def _p99(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]              # a request never served has no latency
    return float(np.percentile(x, 99)) if len(x) else None


def _windows(policy: str, rec, tiers, window_s: float) -> list[dict]:
    """Per window of arrival time: p99 of each tier's latency and of latency/target by priority,
    each also without the relegated requests (`_unrelegated`), and how many were relegated."""
    win = np.floor(rec["arrival_s"] / window_s).astype(int)
    releg = rec["relegated"]
    out = []
    for w in np.unique(win):
        m = win == w
        row = {"policy": policy, "window_start_s": float(w * window_s), "arrivals": int(m.sum()),
               "relegated": int(releg[m].sum())}
        norm, prio, rel = [], [], []
        for t in tiers:
            col, _, target = tier_metric(t)
            mt = m & (rec["tier"] == t.name)
            row[f"{t.name}_arrivals"] = int(mt.sum())
            row[f"{t.name}_relegated"] = int(releg[mt].sum())
            row[f"{t.name}_p99_s"] = _p99(rec[col][mt])
            row[f"{t.name}_p99_unrelegated_s"] = _p99(rec[col][mt & ~releg])
            norm.append(rec[col][mt] / target)
            prio.append(rec["priority"][mt])
            rel.append(releg[mt])
        norm, prio, rel = np.concatenate(norm), np.concatenate(prio), np.concatenate(rel)
        for level in LEVELS:
            row[f"{level}_p99_of_target"] = _p99(norm[prio == level])
            row[f"{level}_p99_of_target_unrelegated"] = _p99(norm[(prio == level) & ~rel])
        out.append(row)
    return out


def _lifted(row: dict, key: str) -> bool:
    """Whether relegated requests set this window's p99 `key` (over LIFT x the rest's)."""
    rest_key = key[:-2] + "_unrelegated_s" if key.endswith("_s") else key + "_unrelegated"
    p99, rest = row[key], row[rest_key]
    return p99 is not None and (rest is None or p99 > LIFT * rest)


def _last_window_spikes(policy: str, rec, last: dict, tiers) -> list[dict]:
    """Tiers whose p99 in the `last` window is set by relegated requests, and when those started."""
    out = []
    for t in tiers:
        if not _lifted(last, f"{t.name}_p99_s"):
            continue
        m = (rec["arrival_s"] >= last["window_start_s"]) & (rec["tier"] == t.name) & rec["relegated"]
        first_token = rec["arrival_s"][m] + rec["ttft_s"][m]
        out.append({"policy": policy, "tier": t.name, "window_start_s": last["window_start_s"],
                    "arrivals": last[f"{t.name}_arrivals"], "relegated": int(m.sum()),
                    "p99_s": last[f"{t.name}_p99_s"], "p99_unrelegated_s": last[f"{t.name}_p99_unrelegated_s"],
                    "first_token_from_s": float(first_token.min()), "first_token_to_s": float(first_token.max()),
                    "after_last_arrival": int((first_token > rec["arrival_s"].max()).sum())})
    return out


def _relegation_note(rows: list[dict], spikes: list[dict], window_s: float) -> str:
    """When relegated requests got their first token, and what sets the last window's p99."""
    started = [f"{r['policy']}'s {r['relegated']} between {r['relegated_first_token_from_s'] / 60:.1f} and "
               f"{r['relegated_first_token_to_s'] / 60:.1f} min ({r['relegated_after_last_arrival']} after the "
               f"last arrival)" for r in rows if r["relegated"]]
    if not started:
        return "No request was relegated."
    end = rows[0]["last_arrival_s"] / 60
    note = ("Relegated requests wait behind every other request and get their first token only when nothing "
            "else waits, late in a low phase or once arrivals stop (last arrival at "
            f"{end:.1f} min): " + "; ".join(started) + ".")
    if not spikes:
        return note + " No tier's p99 in the last window is set by relegated requests."
    drained = {r["policy"]: (r["backlog_s"], (r["last_arrival_s"] + r["backlog_s"]) / 60) for r in rows}
    parts = [f"{s['policy']}'s {s['tier']} p99 of {s['p99_s']:.0f} s comes from the {s['relegated']} of its "
             f"{s['arrivals']} {s['tier']} arrivals that were relegated, {s['after_last_arrival']} of which got their "
             f"first token after arrivals stopped, at {s['first_token_from_s'] / 60:.1f}-"
             f"{s['first_token_to_s'] / 60:.1f} min; the last request finished at {drained[s['policy']][1]:.1f} min, "
             f"{drained[s['policy']][0]:.0f} s after the last arrival (the other {s['arrivals'] - s['relegated']}: p99 "
             + (f"{s['p99_unrelegated_s']:.1f} s)" if s["p99_unrelegated_s"] is not None else "–)")
             for s in spikes]
    return note + f" The spike in the last {window_s:g} s window is this wait, not binning: " + "; ".join(parts) + "."


def _styles(policies, colors) -> dict[str, dict]:
    """One look per policy, in list order, each drawn on top of the ones before: counted from the
    last, every other policy is a wide pale band and the rest thin lines, each with its own colour
    and marker, so two lines that coincide (niyama and a variant) show as a thin line inside a band."""
    markers = "osD^vPX*"
    n = len(policies)
    band = {"lw": 5.0, "alpha": 0.4}
    line = {"lw": 1.2, "alpha": 1.0}
    return {pol: {"color": colors[i % len(colors)], "marker": markers[i % len(markers)], "ms": 4, "zorder": 2 + i,
                  **(line if (n - 1 - i) % 2 == 0 else band)} for i, pol in enumerate(policies)}


def _draw(ax, rows: list[dict], key: str, style: dict, offset: int, num_marks: int, **kw) -> None:
    """One policy's p99 series on `ax`, with sparse staggered markers and a ring where relegation sets it."""
    pts = [(r["window_start_s"] / 60, r[key], _lifted(r, key)) for r in rows if r[key] is not None]
    if not pts:
        return
    x, y, lifted = map(np.array, zip(*pts))
    step = max(len(x) // 12, num_marks)
    ax.plot(x, y, markevery=(offset * step // num_marks, step), **{**style, **kw})
    ax.plot(x[lifted], y[lifted], ls="none", marker="o", ms=10, mfc="none", mec=style["color"], mew=1.2,
            zorder=style["zorder"])


def _plot(series, spikes, p: Params, tiers, lo: float, hi: float, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(tiers) + 1, 1, figsize=(11, 2.7 * (len(tiers) + 1) + 0.9), sharex=True)
    styles = _styles(p.policies, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    by_policy = {pol: [r for r in series if r["policy"] == pol] for pol in p.policies}
    period = p.period_min * 60
    for ax in axes:
        for k in range(1, int(np.ceil(p.duration_h * 3600 / period)), 2):
            ax.axvspan(k * period / 60, (k + 1) * period / 60, color="0.9", lw=0)
    for j, t in enumerate(tiers):
        _, label, target = tier_metric(t)
        ax = axes[j]
        for i, pol in enumerate(p.policies):
            _draw(ax, by_policy[pol], f"{t.name}_p99_s", styles[pol], i, len(p.policies), label=pol)
        ax.axhline(target, color="black", ls=":", lw=1, label="target")
        _annotate_spike(ax, [s for s in spikes if s["tier"] == t.name], p.window_s)
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"{label}, p99 per {p.window_s:g} s window (shaded: {hi:g} QPS, else {lo:g} QPS)", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    pol = "niyama" if "niyama" in p.policies else p.policies[-1]
    for k, (level, ls) in enumerate(zip(LEVELS, ("-", "--"))):
        _draw(ax, by_policy[pol], f"{level}_p99_of_target", {**styles[pol], "lw": 1.2, "alpha": 1.0}, k, 2, ls=ls,
              marker="o" if level == "important" else "x", label=f"{pol}, {level}")
    ax.axhline(1.0, color="black", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("latency / target")
    ax.set_title(f"{pol}: p99 of latency / target by priority hint", fontsize=9)
    ax.set_xlabel("minutes")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    ring = plt.Line2D([], [], ls="none", marker="o", ms=10, mfc="none", mec="0.3", mew=1.2)
    fig.legend(handles + [ring], labels + [f"p99 set by relegated requests (over {LIFT:g} x the rest's p99)"],
               loc="upper center", ncols=len(p.policies) + 2, fontsize=8, frameon=False)
    fig.text(0.01, 0.005, "Counted from the last policy, every other one is a wide pale band under thin lines: "
             "where two coincide, a thin line runs inside a band. Windows are by arrival time.\nRelegated requests "
             "wait behind all others and get their first token only when nothing else waits (late in a low phase, "
             "or once arrivals stop): a ring's latency is that wait.", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return save_figure(fig, path)


def _annotate_spike(ax, spikes: list[dict], window_s: float) -> None:
    """Say on the panel why the last window's p99 jumps, when relegated requests set it."""
    if not spikes:
        return
    x, y = spikes[0]["window_start_s"] / 60, max(s["p99_s"] for s in spikes)
    who = ", ".join(f"{s['policy']} {s['relegated']}/{s['arrivals']}" for s in spikes)
    late = all(s["after_last_arrival"] == s["relegated"] for s in spikes)
    when = "after arrivals stop and the backlog drains" if late else "when nothing else waits"
    ax.annotate(f"last {window_s:g} s: relegated {spikes[0]['tier']} arrivals ({who}),\nfirst token only {when}",
                xy=(x, y), xytext=(0.7, 0.7), textcoords="axes fraction",
                ha="right", va="center", fontsize=7, zorder=20,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9},
                arrowprops={"arrowstyle": "->", "color": "0.3"})
