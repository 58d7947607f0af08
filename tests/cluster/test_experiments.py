"""Every experiment of the paper's evaluation, at --quick size, from the command line:
the files each writes, and the shape of its results (who beats whom, what must hold)."""

import csv
import json
import subprocess
import sys

import pytest

from niyama.cli import main
from niyama.experiments import EXPERIMENTS
from niyama.experiments.overload import Params, _styles

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    assert main(["experiment", "all", "--quick", "--out", str(root), "--quiet"]) == 0
    # a heavier overload, where priority hints must visibly decide who is sacrificed
    assert main(["experiment", "overload", "--quick", "--set", "high_load=1.7", "--set",
                 "policies=niyama-no-priority,niyama", "--out", str(root / "heavy"), "--quiet"]) == 0
    return root


def results(out, name) -> dict:
    return json.loads((out / name / "results.json").read_text())["results"]


def rows_by(rows, *keys) -> dict:
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_writes_csv_png_and_summary(out, name):
    folder = out / name
    pngs = list(folder.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG for p in pngs)
    csvs = list(folder.glob("*.csv"))
    assert csvs and all(len(list(csv.DictReader(p.open()))) > 0 for p in csvs)
    summary = (folder / "summary.md").read_text()
    assert summary.startswith(f"# {EXPERIMENTS[name].title}") and "quick size" in summary and "|---" in summary
    meta = json.loads((folder / "results.json").read_text())
    assert meta["experiment"] == name and meta["quick"] is True


def test_load_sweep_niyama_degrades_least(out):
    pts = results(out, "load-sweep")["points"]
    top = max(p["qps"] for p in pts)
    at_top = {p["policy"]: p for p in pts if p["qps"] == top}
    assert len(pts) == 4 * 3
    assert at_top["niyama"]["violation_pct"] <= at_top["edf"]["violation_pct"] < at_top["fcfs"]["violation_pct"]
    # SRPF starves long prompts: they fail far more often than short ones
    assert at_top["srpf"]["long_violation_pct"] > 5 * at_top["srpf"]["short_violation_pct"]


def test_ablation_each_step_adds_capacity_and_cuts_violations(out):
    rows = rows_by(results(out, "ablation")["rows"], "policy")
    assert rows["edf-dc"]["capacity_qps"] > 1.1 * rows["edf"]["capacity_qps"]
    assert rows["niyama"]["capacity_qps"] >= rows["edf-dc"]["capacity_qps"] * 0.99
    assert rows["niyama"]["violation_pct_at_high"] <= rows["edf"]["violation_pct_at_high"]


def test_overload_protects_important_requests_and_completes_relegated_ones(out):
    res = results(out, "overload")
    rows = rows_by(res["rows"], "policy")
    assert res["low_qps"] < res["reference_capacity_qps"] < res["high_qps"]
    for r in rows.values():
        assert r["relegated_completed"] == r["relegated"]          # relegated, never dropped
    n = rows["niyama"]
    assert n["important_violation_pct"] <= n["low_violation_pct"]
    for base in ("fcfs", "edf"):
        assert n["violation_pct"] < rows[base]["violation_pct"] / 10
        assert n["important_violation_pct"] < rows[base]["important_violation_pct"] / 10
    assert n["max_relegated_ttlt_s"] > 0


def test_overload_summary_says_relegated_requests_set_the_last_minutes_spike(out):
    # the reported "1000 s Q1 spike in the final minute" of the quick run: Q1 requests relegated in the
    # last minute of a high-load phase start only after arrivals stop and the backlog drains
    res = results(out, "overload")
    summary = (out / "overload" / "summary.md").read_text()
    spikes = res["last_window_spikes"]
    assert "niyama" in {s["policy"] for s in spikes}
    for s in spikes:
        assert s["p99_s"] > 100 > 10 * s["p99_unrelegated_s"]
        assert s["after_last_arrival"] == s["relegated"] > 0
        assert s["first_token_from_s"] > rows_by(res["rows"], "policy")[s["policy"]]["last_arrival_s"]
        assert f"{s['policy']}'s {s['tier']} p99 of {s['p99_s']:.0f} s comes from the {s['relegated']}" in summary
    assert "is this wait, not binning" in summary
    windows = [r for r in csv.DictReader((out / "overload" / "overload_windows.csv").open()) if r["policy"] == "niyama"]
    assert int(windows[-1]["Q1_relegated"]) == rows_by(spikes, "policy")["niyama"]["relegated"]


def test_overload_chart_keeps_every_policy_visible_where_lines_coincide():
    policies = Params().policies + ("niyama-reject",)     # a variant appended later gets a look of its own
    styles = _styles(policies, [f"C{i}" for i in range(10)])
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(policies)
    for below, above in zip(policies, policies[1:]):
        a, b = styles[below], styles[above]
        assert b["zorder"] > a["zorder"]
        # drawn on top, a line is either thinner than the one below or see-through
        assert b["lw"] < a["lw"] / 2 or (b["alpha"] < 1 and b["lw"] > 2 * a["lw"])


def test_under_heavy_overload_low_requests_are_sacrificed_first(out):
    rows = rows_by(results(out / "heavy", "overload")["rows"], "policy")
    n, blind = rows["niyama"], rows["niyama-no-priority"]
    assert n["relegated_completed"] == n["relegated"] > blind["relegated"]
    assert n["relegated_important"] < blind["relegated_important"]
    assert n["important_violation_pct"] < 0.85 * blind["important_violation_pct"]
    assert n["low_violation_pct"] > 2 * blind["low_violation_pct"]


def test_mixes_niyama_wins_every_mix(out):
    rows = rows_by(results(out, "mixes")["rows"], "mix", "policy")
    for mix in ("70-15-15", "33-33-33", "15-15-70"):
        assert rows[(mix, "niyama")]["violation_pct"] < min(rows[(mix, "edf")]["violation_pct"],
                                                             rows[(mix, "fcfs")]["violation_pct"])


def test_alpha_trades_long_requests_for_fewer_violations_under_overload(out):
    rows = [r for r in results(out, "alpha")["rows"] if r["load"] == 1.2]
    by = rows_by(rows, "alpha_ms")
    assert by[8.0]["violation_pct"] < by[0.0]["violation_pct"]
    assert by[16.0]["long_violation_pct"] > by[0.0]["long_violation_pct"]


def test_slo_variants_and_prefill_only_order_the_policies(out):
    slo = rows_by(results(out, "slo-variants")["rows"], "policy")
    assert slo["niyama"]["capacity_qps"] > slo["fcfs"]["capacity_qps"]
    pre = rows_by(results(out, "prefill-only")["rows"], "policy")
    assert pre["niyama-no-dc"]["capacity_qps"] >= pre["edf"]["capacity_qps"] > pre["fcfs"]["capacity_qps"]


def test_chunks_are_large_with_slack_and_small_without(out):
    res = results(out, "chunks")
    budgets = {h["token_budget"] for h in res["budget_histogram"]}
    assert min(budgets) <= 256 and max(budgets) == 2552
    assert res["median_slack_ms_small_budget"] < 100 < res["median_slack_ms_large_budget"]
    window = list(csv.DictReader((out / "chunks" / "chunks.csv").open()))
    assert len(window) == 200 and len({r["token_budget"] for r in window}) > 1


@pytest.mark.parametrize("args, message", [
    (["experiment", "nope"], "unknown experiment 'nope'"),
    (["experiment", "alpha", "--set", "beta=1"], "has no option 'beta'"),
    (["experiment", "alpha", "--set", "loads=high"], "expected a comma-separated list"),
    (["experiment", "all", "--set", "beta=1"], "no experiment has that parameter"),
    (["experiment", "mixes", "--opt", "gamma=2"], "no policy has a knob 'gamma'"),
])
def test_bad_experiment_arguments_say_what_to_fix(args, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "niyama.cli", *args, "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr, p.stderr
