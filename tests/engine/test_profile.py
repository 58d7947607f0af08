"""Batch-time profiling: the fits on known functions, the held-out split, profile JSON and names, and
`niyama profile --quick` then `niyama fit-predictor` on the real default model (CPU)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys

import pytest

from niyama.predictor import LinearSpline, TwoRegimeLinear, load_profile, profiles
from niyama.predictor.fit import error_summary, fit_spline, fit_two_regime, kind, split_by_shape


def synthetic_rows(truth, n: int = 240, seed: int = 0, noise: float = 0.0) -> list[tuple]:
    """Rows (prefill, decodes, decode context sum, prefill context, seconds) over the shapes a profile
    covers: decode-only, prefill-only and mixed steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % 3
        d = 0 if k == 1 else rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256])
        p = 0 if k == 0 else rng.randrange(16, 2553 - d)
        pctx = 0 if not p else rng.choice([0, 0, 256, 1024, 2048, 4096])
        dctx = d * rng.choice([128, 512, 1024, 2048])
        rows.append((p, d, dctx, pctx, truth(p, d, dctx, pctx) * rng.lognormvariate(0, noise)))
    return rows


def linear_truth(p, d, dctx, pctx):
    total = p + d
    return 0.004 + 2e-5 * total + 3e-5 * p + 1e-5 * d + 2e-8 * dctx + 1e-7 * pctx


def kinked_truth(p, d, dctx, pctx):
    """Flat (memory-bound) up to 256 tokens, then compute-bound; attention's quadratic cost of a chunk."""
    total = p + d
    return 0.01 + 5e-6 * total + 4e-5 * max(0, total - 256) + 2e-8 * dctx + 4e-9 * p * (pctx + p / 2)


def test_both_fits_recover_a_linear_truth():
    rows = synthetic_rows(linear_truth)
    for fit in (fit_two_regime, fit_spline):
        err = error_summary(fit(rows, name="t"), rows)["all"]
        assert err["max"] < 1e-3, (fit.__name__, err)


def test_the_spline_beats_the_linear_model_on_a_kink_and_quadratic_attention():
    train, test = split_by_shape(synthetic_rows(kinked_truth, n=300, noise=0.02), 0.25, seed=0)
    spline = error_summary(fit_spline(train, name="s"), test)
    linear = error_summary(fit_two_regime(train, name="l"), test)
    assert spline["all"]["mape"] < 0.03 and spline["all"]["p95"] < 0.06
    assert linear["all"]["mape"] > 2 * spline["all"]["mape"]
    # without noise the spline is the truth's own family: exact
    exact = synthetic_rows(kinked_truth, n=120, seed=1)
    assert error_summary(fit_spline(exact, name="s"), exact)["all"]["max"] < 1e-6


def test_held_out_split_is_by_shape_and_covers_every_kind():
    base = synthetic_rows(linear_truth, n=90)
    rows = [r[:4] + (r[4] * f,) for r in base for f in (0.9, 1.0, 1.1)]      # each shape measured 3 times
    train, test = split_by_shape(rows, 0.25, seed=3)
    seen, held = {r[:4] for r in train}, {r[:4] for r in test}
    assert not seen & held and len(train) + len(test) == len(rows)
    assert {kind(r[0], r[1]) for r in test} == {"decode", "prefill", "mixed"}
    assert 0.2 < len(held) / len(seen | held) < 0.3
    assert split_by_shape(rows, 0.25, seed=3) == (train, test)                # seeded
    with pytest.raises(ValueError):
        split_by_shape(rows, 1.0)


def test_spline_json_round_trip_and_load_by_path_name_and_scale(tmp_path, monkeypatch):
    spline = fit_spline(synthetic_rows(kinked_truth), name="test-machine")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spline.to_dict()))
    shapes = [(512, 0, 0, 0), (0, 64, 64 * 1024, 0), (1000, 24, 24 * 900, 2048), (16, 1, 200, 0)]
    loaded = load_profile(str(path))
    assert isinstance(loaded, LinearSpline) and loaded == spline
    assert [loaded.batch_time(*s) for s in shapes] == [spline.batch_time(*s) for s in shapes]
    assert load_profile(f"{path}*2").batch_time(*shapes[0]) == pytest.approx(2 * spline.batch_time(*shapes[0]))
    # shipped by name: a JSON dropped into the package's data folder (a temporary one here)
    monkeypatch.setattr(profiles, "DATA_DIR", tmp_path)
    (tmp_path / "test-machine.json").write_text(json.dumps(spline.to_dict()))
    (tmp_path / "test-linear.json").write_text(json.dumps(fit_two_regime(synthetic_rows(linear_truth),
                                                                         name="test-linear").to_dict()))
    assert profiles.shipped_names() == ["p", "test-linear", "test-machine"]
    assert load_profile("test-machine") == spline and isinstance(load_profile("test-linear"), TwoRegimeLinear)
    assert load_profile("test-machine*0.5").batch_time(*shapes[2]) == pytest.approx(0.5 * spline.batch_time(*shapes[2]))
    assert load_profile("a100-llama3-8b") is profiles.PROFILES["a100-llama3-8b"]
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("no-such-machine")
    (tmp_path / "odd.json").write_text(json.dumps({"kind": "forest", "name": "odd"}))
    with pytest.raises(ValueError, match="unsupported profile kind"):
        load_profile("odd")
    assert "odd" not in profiles._all_profiles() and "test-machine" in profiles._all_profiles()   # import survives


def test_the_spline_learns_what_a_sampled_row_costs():
    """Rows with a sampled-row count (a 6th column): the spline recovers the per-row cost; rows without the
    column read as 0 sampled rows, and a profile without the term predicts as before."""
    rng = random.Random(4)
    rows = []
    for p, d, dctx, pctx, y in synthetic_rows(kinked_truth, n=300, seed=2):
        s = rng.randint(0, d + (p > 0))
        rows.append((p, d, dctx, pctx, y + 8e-6 * s, s))
    spline = fit_spline(rows, name="s")
    assert spline.sampled == pytest.approx(8e-6, rel=0.02)
    assert error_summary(spline, rows)["all"]["max"] < 1e-3
    assert spline.batch_time(0, 64, 64 * 512, 0, 64) - spline.batch_time(0, 64, 64 * 512, 0) == pytest.approx(64 * 8e-6)
    plain = fit_spline(synthetic_rows(kinked_truth, n=120, seed=1), name="p")
    assert plain.sampled == 0 and plain.batch_time(100, 4, 400, 0, 5) == plain.batch_time(100, 4, 400, 0)
    assert LinearSpline.from_dict({k: v for k, v in spline.to_dict().items() if k != "sampled"}).sampled == 0


def test_fit_predictor_takes_replay_step_logs_and_scores_unseen_runs(tmp_path):
    """Step logs (replay's steps.csv, with the sampled column) fitted beside a profile CSV without it; --score-on
    reports the chosen profile's error on another run and the JSON records what it was fitted and scored on."""
    def write(path, rows, header):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    truth = lambda p, d, dc, pc, s: kinked_truth(p, d, dc, pc) + 5e-6 * s      # noqa: E731
    rng = random.Random(0)
    profile_rows = [(kind(p, d), p, pc, d, dc, p + d, f"{y:.6g}", "", f"{y:.6g}", 3)
                    for p, d, dc, pc, y in synthetic_rows(kinked_truth, n=150)]
    write(tmp_path / "p.csv", profile_rows, ("kind", "prefill_tokens", "prefill_context", "decodes", "decode_context",
                                             "total_tokens", "wall_s", "gpu_s", "wall_min_s", "repeats"))
    for name, seed in (("a", 1), ("b", 2)):
        steps = []
        for p, d, dc, pc, _ in synthetic_rows(kinked_truth, n=200, seed=seed):
            s = rng.randint(0, d)
            steps.append((p, d, dc, pc, truth(p, d, dc, pc, s), s))
        write(tmp_path / f"{name}.csv", steps, ("prefill_tokens", "decodes", "decode_context", "prefill_context",
                                                 "seconds", "sampled"))
    out = tmp_path / "fit.json"
    r = niyama("fit-predictor", str(tmp_path / "p.csv"), str(tmp_path / "a.csv"), "--model", "spline",
               "--score-on", str(tmp_path / "b.csv"), "--out", str(out), "--name", "t")
    assert r.returncode == 0, r.stderr
    assert "350 measured steps" in r.stdout and "the chosen profile on" in r.stdout
    data = json.loads(out.read_text())
    assert data["fitted_on"] == ["p.csv", "a.csv"] and data["scored_on"]["b.csv"]["steps"] == 200
    assert data["scored_on"]["b.csv"]["mape"] < 0.01 and data["sampled"] == pytest.approx(5e-6, rel=0.05)
    bad = niyama("fit-predictor", str(tmp_path / "p.csv"), "--score-on", str(tmp_path / "nope.csv"))
    assert bad.returncode != 0 and "no such file" in bad.stderr


def test_spline_is_sane_beyond_the_measured_range():
    spline = fit_spline(synthetic_rows(kinked_truth), name="s")
    assert spline.max_total <= 2552
    times = [spline.batch_time(t, 0, 0, 0) for t in (2552, 4096, 8192, 16384)]
    assert times == sorted(times) and times[-1] > 2 * times[0]
    assert spline.batch_time(0, 1, 1, 0) >= spline.min_s > 0
    assert spline.batch_time(0, 0, 0, 0) == pytest.approx(spline.min_s) or spline.batch_time(0, 0, 0, 0) > 0


def test_the_sample_leaves_out_what_the_kv_cache_cannot_hold_in_whole_blocks():
    pytest.importorskip("torch")
    from niyama.engine.profiling import Shape, SyntheticSteps, sample_shapes
    from niyama.kv import BlockAllocator

    alloc = BlockAllocator(num_blocks=1000, block_size=16, watermark=0.0)
    steps = SyntheticSteps(executor=None, allocator=alloc, max_len=8192, vocab_size=100)
    # 24 decodes of 640 tokens: 15,384 tokens fit 16,000, but 24 x 41 blocks (984) fit 1,000 only just
    assert steps.why_not(Shape(0, 0, 24, 640)) is None
    assert "KV cache" in steps.why_not(Shape(0, 0, 25, 640))       # 25 x 41 = 1,025 blocks
    assert "model context" in steps.why_not(Shape(2048, 6144, 0, 0))
    shapes, skipped = sample_shapes(200, steps, max_num_seqs=256, seed=1)
    assert len(shapes) == len(set(shapes)) == 200
    assert all(s.kv_blocks(16) <= 1000 for s in shapes) and skipped["decode"] and skipped["mixed"]
    assert {s.kind for s in shapes} == {"decode", "prefill", "mixed"}
    assert sample_shapes(200, steps, max_num_seqs=256, seed=1)[0] == shapes                   # seeded


def niyama(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # one thread: where other jobs share the cores, OpenMP's barriers make a 2-thread step 10x slower and erratic
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_profile_quick_then_fit_predictor_on_the_default_model(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "profile.csv"
    r = niyama("profile", "--quick", "--device", "cpu", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stdout and "over the KV cache" in r.stdout      # 32K KV tokens on a CPU
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) >= {"kind", "prefill_tokens", "prefill_context", "decodes", "decode_context",
                            "total_tokens", "sampled", "wall_s", "gpu_s", "repeats"}
    # the default serving mix: some rows sample, some are greedy; never more than the rows that draw
    sampled = [int(row["sampled"]) for row in rows]
    drawing = [int(row["decodes"]) + (int(row["prefill_tokens"]) > 0) for row in rows]
    assert sum(sampled) > 0 and sum(sampled) < sum(drawing) and all(s <= d for s, d in zip(sampled, drawing))
    assert {row["kind"] for row in rows} == {"decode", "prefill", "mixed"}
    assert len(rows) == 20 and all(float(row["wall_s"]) > 0 and row["gpu_s"] == "" for row in rows)
    assert any(int(row["prefill_context"]) > 0 for row in rows)
    meta = json.loads((tmp_path / "profile.meta.json").read_text())
    assert meta["device_type"] == "cpu" and meta["dtype"] == "float32" and meta["torch"]

    fitted = tmp_path / "cpu.json"
    r = niyama("fit-predictor", str(out), "--out", str(fitted), "--name", "cpu-test")
    assert r.returncode == 0, r.stderr
    table = {(m, k): float(v) for m, k, v in re.findall(r"^(linear|spline)\s+(\w+)\s+\d+\s+([\d.]+)%", r.stdout,
                                                        re.M)}
    print(r.stdout)
    assert {("linear", "all"), ("spline", "all")} <= set(table)
    chosen = min(("linear", "spline"), key=lambda m: table[(m, "all")])
    assert table[(chosen, "all")] < 25.0               # a quick, noisy run; the full run's numbers: docs/profiling.md
    profile = load_profile(str(fitted))
    assert profile.name == "cpu-test" and json.loads(fitted.read_text())["measured_on"]["device"]
    assert profile.batch_time(512, 0, 0, 0) > 0
