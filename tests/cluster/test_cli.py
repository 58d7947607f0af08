"""The `niyama` command as a user runs it: a real subprocess, real files."""

import csv
import json
import subprocess
import sys

import pytest


def niyama(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_simulate_prints_report_and_writes_records(tmp_path):
    out = tmp_path / "sim"
    p = niyama("simulate", "--trace", "azure-conv", "--policy", "niyama", "--qps", "4", "--requests", "800",
               "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "Q1" in p.stdout and "violations: overall" in p.stdout
    rows = list(csv.DictReader((out / "records.csv").open()))
    assert len(rows) == 800 and {"ttft_s", "ttlt_s", "violated_strict", "relegated"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_requests"] == 800 and len(summary["tiers"]) == 3


def test_capacity_writes_table_and_chart(tmp_path):
    out = tmp_path / "cap"
    p = niyama("capacity", "--trace", "azure-conv", "--policies", "fcfs,niyama", "--duration-h", "0.5",
               "--no-sustainable", "--out", str(out), "--quiet", "--jobs", "2")
    assert p.returncode == 0, p.stderr
    rows = {r["policy"]: float(r["capacity_qps"]) for r in csv.DictReader((out / "capacity.csv").open())}
    assert set(rows) == {"fcfs", "niyama"} and all(v > 0 for v in rows.values())
    for r in csv.DictReader((out / "capacity.csv").open()):    # each capacity as a share of `niyama bound`
        assert float(r["bound_qps"]) == pytest.approx(6.36, abs=0.01) and r["sustainable_pct_of_bound"] == ""
        assert float(r["capacity_pct_of_bound"]) == pytest.approx(100 * rows[r["policy"]] / 6.362, rel=1e-3)
    assert "% of bound" in p.stdout
    assert (out / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = list(csv.DictReader((out / "points.csv").open()))
    assert any(r["passed"] == "True" for r in points) and any(r["passed"] == "False" for r in points)


@pytest.mark.parametrize("args, message", [
    (("simulate", "--policy", "lifo", "--qps", "1"), "unknown policy"),
    (("simulate", "--qps", "1", "--opt", "alpha=1"), "has no option 'alpha'"),
    (("simulate", "--qps", "1", "--opt", "relegation=maybe"), "expected a bool"),
    (("simulate", "--trace", "nope.csv", "--qps", "1"), "--trace: no such file: nope.csv"),
    (("simulate", "--trace", "azure-cod", "--qps", "1"), "unknown trace 'azure-cod'"),
    (("simulate", "--tiers", "data/tiers.json", "--qps", "1"), "--tiers: no such file: data/tiers.json"),
    (("simulate", "--qps", "1", "--tier-mix", "1,2"), "tier mix"),
    (("simulate",), "need --qps"),
])
def test_bad_input_is_a_clear_error(args, message):
    p = niyama(*args)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr


def test_policies_lists_knobs():
    p = niyama("policies")
    assert p.returncode == 0 and "alpha_s = 0.008" in p.stdout and "edf-dc:" in p.stdout


def test_capacity_refuses_tiny_runs_and_warns_about_short_ones(tmp_path):
    r = niyama("capacity", "--requests", "10")
    assert r.returncode == 2 and "too few" in r.stderr
    r = niyama("capacity", "--requests", "600", "--traces", "azure-code", "--policies", "fcfs", "--no-sustainable",
               "--quiet", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "warning: azure-code/fcfs" in r.stderr and "less than the longest deadline (1800 s)" in r.stderr


def test_experiment_list_shows_readable_numbers():
    r = niyama("experiment", "list")
    assert r.returncode == 0 and "low_load = 0.5263\n" in r.stdout and "0.5263157894736842" not in r.stdout
