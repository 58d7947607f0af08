"""`niyama generate` and `niyama replay` as a user runs them: subprocesses on the real default model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")


def niyama(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_answers_the_question():
    r = niyama("generate", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens in" in r.stderr and "stopped: stop" in r.stderr


def test_generate_rejects_bad_input_with_a_message():
    r = niyama("generate", "hi", "--top-p", "2")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    r = niyama("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    r = niyama("generate", "hi", "--model", "llama-3-8b")
    assert r.returncode == 2 and "--load-format dummy" in r.stderr


def test_a_missing_torch_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None; from niyama.cli import main; "
            "sys.exit(main(['generate', 'Hi']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "PyTorch is missing" in r.stderr and "download.pytorch.org/whl/cpu" in r.stderr and "niyama[engine]" in r.stderr


def test_replay_prints_the_simulator_report_and_fits_a_profile(tmp_path):
    r = niyama("replay", "--trace", "azure-conv", "--qps", "4", "--requests", "12", "--max-prompt-tokens", "96",
               "--max-output-tokens", "12", "--kv-tokens", "4096", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "azure-conv x niyama at 4 QPS: 12 requests" in r.stdout
    assert "TTFT p50/p95/p99" in r.stdout and "violations: overall" in r.stdout
    with open(tmp_path / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert all(int(row["output_tokens"]) == min(12, int(row["output_tokens"])) for row in rows)
    assert all(float(row["ttft_s"]) > 0 and float(row["ttlt_s"]) >= float(row["ttft_s"]) for row in rows)
    with open(tmp_path / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    produced = sum(int(row["output_tokens"]) for row in rows)
    prefilled = sum(int(s["prefill_tokens"]) for s in steps)
    decoded = sum(int(s["decodes"]) for s in steps)
    assert decoded + len(rows) == produced          # every token came from a decode or a prefill's last chunk
    assert prefilled == sum(int(row["prompt_tokens"]) for row in rows)   # no preemption at this size
    assert all(int(s["sampled"]) == 0 for s in steps)         # greedy unless --sampling says otherwise
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["kind"] == "two-regime-linear"
    assert (tmp_path / "summary.json").exists()


def test_replay_with_a_sampling_mix_logs_the_sampled_rows(tmp_path):
    """--sampling with a JSON mix: the steps log how many of their rows sampled, some but not all of the tokens
    drawn; a bad mix is refused before the model loads."""
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"share": 3, "temperature": 0.7, "top_p": 0.9},
                               {"share": 1, "temperature": 0, "repetition_penalty": 1.2}, {"temperature": 0}]))
    r = niyama("replay", "--trace", "azure-conv", "--qps", "4", "--requests", "10", "--max-prompt-tokens", "64",
               "--max-output-tokens", "8", "--kv-tokens", "4096", "--sampling", str(mix), "--out", str(tmp_path),
               "--quiet")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    with open(tmp_path / "records.csv") as f:
        draws = sum(int(row["output_tokens"]) for row in csv.DictReader(f))
    # 3 + 1 of 5 shares sample or penalize (a greedy penalized row counts: it needs the sampler's slot)
    assert 0 < sum(int(s["sampled"]) for s in steps) < draws
    mix.write_text(json.dumps([{"temperature": 0.7, "top_q": 0.9}]))
    bad = niyama("replay", "--trace", "azure-conv", "--qps", "4", "--requests", "2", "--sampling", str(mix),
                 "--out", str(tmp_path))
    assert bad.returncode != 0 and "unknown keys ['top_q']" in bad.stderr


def test_gguf_rotary_unpermute_inverts_llama_cpp_layout():
    from niyama.engine.weights import _unpermute_rotary

    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: per head, rows [half, 2] interleave the two rotary halves
    stored = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(stored, w)
    assert np.array_equal(_unpermute_rotary(stored, heads), w)
