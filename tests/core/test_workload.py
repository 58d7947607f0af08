import numpy as np
import pytest

from niyama.qos import Priority
from niyama.workload import load_trace, make_workload
from niyama.workload.arrivals import GAP_CAP, diurnal, poisson


def test_shipped_traces_load_from_the_package():
    for name, rows in (("azure-code", 8819), ("azure-conv", 19366), ("sharegpt", 30731)):
        t = load_trace(name)
        assert len(t) == rows and t.prompt_tokens.min() >= 1 and t.output_tokens.min() >= 1
    assert load_trace("azure-code").arrivals_s[0] == 0.0
    assert load_trace("sharegpt").arrivals_s is None


def test_user_csv_and_its_errors(tmp_path):
    good = tmp_path / "mine.csv"
    good.write_text("num_prefill_tokens,num_decode_tokens\n100,10\n200,20\n")
    t = load_trace(str(good))
    assert list(t.prompt_tokens) == [100, 200] and t.name == "mine"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,output\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        load_trace(str(bad))
    bad.write_text("num_prefill_tokens,num_decode_tokens\n100,x\n")
    with pytest.raises(ValueError, match="line 2"):
        load_trace(str(bad))
    with pytest.raises(ValueError, match="unknown trace"):
        load_trace("no-such-trace")


def test_poisson_rate_and_gap_cap():
    rng = np.random.default_rng(0)
    t = poisson(200_000, 4.0, rng)
    gaps = np.diff(t)
    assert t[0] == 0.0
    assert gaps.max() <= GAP_CAP / 4.0 + 1e-12
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.01)


def test_same_seed_scales_arrivals_with_load():
    a = make_workload("sharegpt", 1.0, num_requests=100, seed=5)
    b = make_workload("sharegpt", 2.0, num_requests=100, seed=5)
    assert [s.arrival_s / 2 for s in a.specs] == pytest.approx([s.arrival_s for s in b.specs])
    assert [(s.num_prompt_tokens, s.tier) for s in a.specs] == [(s.num_prompt_tokens, s.tier) for s in b.specs]


def test_default_size_spans_four_hours_and_samples_when_the_trace_is_short():
    wl = make_workload("azure-code", 2.0)           # 28,800 requests > 8,819 rows
    assert len(wl) == 4 * 3600 * 2
    assert 0.97 * 4 * 3600 < wl.last_arrival_s < 1.03 * 4 * 3600


def test_tier_mix_and_priorities():
    wl = make_workload("azure-conv", 3.0, num_requests=20_000, tier_mix="70,15,15", low_priority_fraction=0.2)
    tiers = np.array([s.tier for s in wl.specs])
    assert np.mean(tiers == "Q1") == pytest.approx(0.70, abs=0.02)
    assert np.mean([s.priority is Priority.LOW for s in wl.specs]) == pytest.approx(0.2, abs=0.02)
    assert wl.rule.output_len_pred == 150                # the trace's L_pred


def test_diurnal_alternates_levels():
    t = diurnal(4 * 3600, 2.0, 5.0, 900, np.random.default_rng(1))
    counts = np.histogram(t, bins=16, range=(0, 4 * 3600))[0] / 900
    assert counts[0::2].mean() == pytest.approx(2.0, rel=0.05)
    assert counts[1::2].mean() == pytest.approx(5.0, rel=0.05)


def test_trace_arrivals_replay():
    wl = make_workload("azure-code", None, arrival="trace", num_requests=50)
    assert [s.arrival_s for s in wl.specs] == pytest.approx(list(load_trace("azure-code").arrivals_s[:50]))
    with pytest.raises(ValueError, match="no arrival times"):
        make_workload("sharegpt", None, arrival="trace")
