"""Throughput bounds (`niyama.metrics.throughput_bound`, `niyama bound`): hand-computed cases, the simulator's side."""

import json
import math

import numpy as np
import pytest

from niyama.cli import main
from niyama.cli.capacity import format_table, with_bounds
from niyama.metrics.throughput_bound import Lengths, request_lengths, throughput_bound, trace_bound
from niyama.predictor import load_profile
from niyama.sim import simulate
from niyama.sim.scenario import Scenario
from niyama.workload import make_workload


class Affine:
    """t = 10 ms + 0.1 ms per prompt token + 0.2 ms per decode + 1 us per decode-context token
    + 10 us per prefill-context token."""

    name = "affine"

    def batch_time(self, p, d, decode_context, prefill_context):
        return 0.010 + 1e-4 * p + 2e-4 * d + 1e-6 * decode_context + 1e-5 * prefill_context


class DecodeStep:
    """No context costs, but any step with decodes pays 20 ms more: decodes are cheap only in bulk."""

    name = "decode-step"

    def batch_time(self, p, d, decode_context, prefill_context):
        return 0.010 + 1e-4 * p + 1e-5 * d + (0.020 if d else 0.0)


# Two requests: prompts 100 and 300, outputs 3 and 5, so 2 and 4 decodes (the prefill emits the first token).
# P = 200, D = 3. Decode contexts: 101, 102 and 301..304, sum 203 + 1210 = 1413 over 6 decodes: Cd = 235.5.
TWO = Lengths.of([100, 300], [3, 5])


def test_means_and_contexts_by_hand():
    assert (TWO.mean_prompt, TWO.mean_decode, TWO.decode_context) == (200, 3, 235.5)
    # chunks of 200: starts 0 | 0, 200: 200 over 400 / 200 = 2 steps -> 100 per step
    assert TWO.prefill_context(200) == pytest.approx(100)
    # chunks of 100: 0 | 0, 100, 200: 300 over 4 steps -> 75; chunks of 300 or more: no context
    assert list(TWO.prefill_context([100, 300, 1000])) == pytest.approx([75, 0, 0])


def test_prefill_context_matches_chunk_starts_enumerated():
    rng = np.random.default_rng(3)
    prompts = rng.integers(1, 5000, 300)
    lengths = Lengths.of(prompts, np.full(300, 2))
    for c in (1, 7, 128, 2552, 613.5):
        starts = sum(sum(j * c for j in range(math.ceil(p / c))) for p in prompts)
        assert lengths.prefill_context(c) == pytest.approx(starts / (prompts.sum() / c), rel=1e-12)


def test_bound_by_hand():
    b = throughput_bound(Affine(), TWO, budget=203)
    # d = 203 * 3 / 203 = 3 decodes, p = 200 prefill tokens; Cp(200) = 100; decode context 3 * 235.5.
    # t = 0.010 + 0.0200 + 0.0006 + 0.0007065 + 0.0010 = 0.0323065 s; QPS = 200 / (t * 200) = 30.9535
    assert (b.step.prefill_tokens, b.step.decodes) == (200, 3)
    assert (b.step.decode_context, b.step.prefill_context) == pytest.approx((706.5, 100))
    assert b.step.time_s == pytest.approx(0.0323065)
    assert b.qps == pytest.approx(30.953523, rel=1e-6)
    # separate: prefill chunks of 203 (Cp = 203^2 * 1 / 400 = 103.0225): (0.010 + 0.0203 + 0.00103) / 203 =
    # 1.543361e-4 s per token; 203 decodes (the most a step holds): 0.010 / 203 + 2e-4 + 235.5e-6 = 4.847611e-4;
    # QPS = 1 / (200 * 1.543361e-4 + 3 * 4.847611e-4) = 30.93916, just below the mixed step
    s = b.separate
    assert (s.prefill_chunk, s.decode_batch) == (203, 203)
    assert (s.prefill_s_per_token, s.decode_s_per_token) == pytest.approx((1.5433608e-4, 4.8476108e-4))
    assert s.qps == pytest.approx(30.939158, rel=1e-6)
    assert b.mixed.qps >= b.qps and b.shared.qps >= max(b.mixed.qps, s.qps)
    assert b.absolute_qps == max(b.mixed.qps, s.qps, b.shared.qps)


def test_decodes_capped_at_max_num_seqs():
    b = throughput_bound(Affine(), TWO, budget=203, max_num_seqs=2)
    # d = 2 (not 3), p = 2 * 200 / 3 = 133.3: the step is not full. Chunks of 133.3: 0 | 0, 133.3, 266.7 ->
    # Cp = 400 / 3 per step (3 steps). t = 0.010 + 0.013333 + 0.0004 + 0.000471 + 0.001333 = 0.0255377 s;
    # QPS = (133.3 / 200) / t = (2 / 3) / t = 26.10523
    assert (b.step.prefill_tokens, b.step.decodes) == pytest.approx((400 / 3, 2))
    assert b.step.prefill_context == pytest.approx(400 / 3)
    assert b.qps == pytest.approx(26.105230, rel=1e-6)
    assert b.separate.decode_batch == 2 and all(s.decodes <= 2 for s in b.shared.steps)


def test_time_sharing_beats_one_shape_when_decodes_have_a_fixed_cost():
    b = throughput_bound(DecodeStep(), TWO, budget=203, max_num_seqs=50)
    # mixed 200 + 3: t = 0.010 + 0.020 + 0.00003 + 0.020 = 0.05003 s -> 19.988 QPS
    assert b.qps == pytest.approx(19.988007, rel=1e-6)
    # separate: 203-token prefill steps, 0.0303 s; 50-decode steps, 0.0305 s: 200 * 0.0303 / 203 + 3 * 0.0305 / 50
    # = 0.031682 s per request -> 31.563 QPS
    assert b.separate.qps == pytest.approx(31.563448, rel=1e-6)
    # time-shared: 203-token prefill steps (0.0303 s) and full steps of 153 + 50 (0.0458 s); a request's 3 decodes
    # take 0.06 of the latter, which also do 9.18 of its 200 prompt tokens, the rest 0.94 of the former:
    # 0.94 * 0.0303 + 0.06 * 0.0458 = 0.03123 s -> 32.0205 QPS, 8.8% of the time in the 153 + 50 steps
    assert b.shared.qps == pytest.approx(32.020493, rel=1e-6)
    assert b.absolute_kind == "time-shared" and b.absolute_qps == b.shared.qps
    shapes = {(s.prefill_tokens, s.decodes): share for s, share in zip(b.shared.steps, b.shared.time_shares)}
    assert shapes == pytest.approx({(203, 0): 1 - 0.0879923, (153, 50): 0.0879923})


def test_time_sharing_gains_nothing_on_an_affine_profile_without_contexts():
    class NoContext:
        name = "no-context"

        def batch_time(self, p, d, decode_context, prefill_context):
            return 0.010 + 1e-4 * p + 2e-4 * d

    b = throughput_bound(NoContext(), TWO, budget=203)
    # every full step costs the same per token: 1 / (0.010 + 0.0200 + 0.0006) = 32.6797 QPS at best
    assert b.qps == pytest.approx(1 / 0.0306)
    assert b.absolute_qps == pytest.approx(1 / 0.0306, rel=1e-9) and b.absolute_kind == "mixed"


def test_paced_bound_by_hand():
    class NoContext:
        name = "no-context"

        def batch_time(self, p, d, decode_context, prefill_context):
            return 0.010 + 1e-4 * p + 2e-4 * d

    b = throughput_bound(NoContext(), TWO, budget=203, pace_s=0.020)
    # a step of T tokens in the mix (p = 200T/203, d = 3T/203) takes 0.010 + T * 0.0206 / 203 s: at most 20 ms up
    # to T = 98 (98.54); p = 96.5517, t = 0.0199448 s, QPS = p / (t * 200) = 24.2048
    assert b.paced.total_tokens == pytest.approx(98)
    assert b.paced.time_s == pytest.approx(0.010 + 98 * 0.0206 / 203)
    assert b.paced_qps == pytest.approx(24.2048, rel=1e-5)
    assert b.paced_qps < b.qps
    assert throughput_bound(NoContext(), TWO, budget=203, pace_s=0.005).paced_qps == 0     # no step is that short
    assert throughput_bound(NoContext(), TWO, budget=203).paced_qps is None               # no interactive tier


def test_paced_bound_of_shipped_traces_uses_the_tightest_tbt():
    b = trace_bound("sharegpt", "a100-llama3-8b", num_requests=2000)
    assert b.pace_s == 0.055 and b.paced.time_s <= 0.055
    assert b.paced_qps < b.qps
    assert trace_bound("azure-conv", "a100-llama3-8b", num_requests=2000).pace_s == 0.050


def test_lengths_are_the_simulators_draws():
    lengths = request_lengths("azure-conv", num_requests=500, seed=4)
    wl = make_workload("azure-conv", 3.0, num_requests=500, seed=4)
    assert list(lengths.prompt_tokens) == [s.num_prompt_tokens for s in wl.specs]
    assert list(lengths.decode_tokens) == [s.num_output_tokens - 1 for s in wl.specs]
    assert request_lengths("azure-conv", 500, seed=4, output_tokens=1).mean_decode == 0


@pytest.mark.parametrize("profile", ["a100-llama3-8b", "h100-llama3-8b"])
def test_absolute_at_least_the_2552_bound_on_shipped_traces(profile):
    for trace in ("azure-code", "sharegpt"):
        b = trace_bound(trace, profile, num_requests=5000)
        assert 0 < b.qps <= b.absolute_qps < 1.05 * b.qps
        assert b.step.total_tokens <= 2552 and b.step.decodes <= 256


def test_a_simulated_replica_far_above_the_bound_finishes_no_faster_than_the_absolute_bound():
    wl = make_workload("azure-conv", 1000.0, num_requests=1500, seed=1)     # ~250x the bound: all queued at once
    res = simulate(wl, "niyama")
    rate = len(res.requests) / max(r.finish_s for r in res.requests)
    b = throughput_bound(load_profile("a100-llama3-8b"), Lengths.of([s.num_prompt_tokens for s in wl.specs],
                                                                    [s.num_output_tokens for s in wl.specs]))
    assert rate <= b.absolute_qps
    assert rate > 0.8 * b.qps       # and the bound is not loose: niyama gets to ~87% of it


def test_bound_cli(tmp_path, capsys):
    path = tmp_path / "bound.json"
    assert main(["bound", "--trace", "azure-code", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("azure-code"))
    assert "2065.0" in row and "2520+32 tokens" in row and "mixed" in row
    (data,) = json.loads(path.read_text())
    assert data["trace"] == "azure-code" and data["profile"] == "a100-llama3-8b" and data["num_requests"] == 20000
    assert f"{data['bound_qps']:.3f}" in row and data["absolute_qps"] >= data["bound_qps"]
    assert main(["bound", "--trace", "azure-code", "--max-num-seqs", "0"]) == 2


def test_capacity_rows_carry_the_bound():
    rows = [{"trace": "azure-code", "policy": "niyama", "capacity_qps": 2.331, "sustainable_qps": None,
             "points": [], "long_points": [], "seconds": 1.0}]
    (row,) = with_bounds(rows, [Scenario("azure-code", "niyama")])
    bound = trace_bound("azure-code", "a100-llama3-8b").qps
    assert row["bound_qps"] == bound and row["capacity_pct_of_bound"] == pytest.approx(100 * 2.331 / bound)
    assert row["sustainable_pct_of_bound"] is None
    assert f"{bound:.2f}" in format_table(rows) and "50%" in format_table(rows)
