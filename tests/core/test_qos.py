import json

import pytest

from niyama.qos import TIER_PRESETS, DeadlineRule, Priority, Tier, load_tiers, parse_mix, token_deadline

from helpers import req


def test_effective_ttft_of_non_interactive_leaves_room_for_predicted_output():
    q1, q2, q3 = TIER_PRESETS["default"]
    rule = DeadlineRule(output_len_pred=15)
    assert rule.ttft_s(q1) == 6.0 and rule.tbt_s(q1) == 0.05
    assert rule.ttft_s(q2) == pytest.approx(600 - 15 * 0.4)      # 594 s
    assert rule.ttft_s(q3) == pytest.approx(1800 - 15 * 0.4)
    assert rule.tbt_s(q2) == 0.4
    assert DeadlineRule(output_len_pred=150).ttft_s(q2) == pytest.approx(540.0)
    # never negative, even when the predicted output alone exceeds the TTLT
    assert DeadlineRule(output_len_pred=10_000).ttft_s(q2) == 0.0


def test_token_deadlines_anchor_at_first_token_or_d1():
    # arrival 10, TTFT 6, TBT 50 ms: D1 = 16
    assert token_deadline(1, 10.0, 6.0, 0.05, None) == 16.0
    # early first token (12 s) banks slack: anchor stays at D1
    assert token_deadline(2, 10.0, 6.0, 0.05, 12.0) == pytest.approx(16.05)
    assert token_deadline(11, 10.0, 6.0, 0.05, 12.0) == pytest.approx(16.5)
    # late first token (20 s) re-anchors there
    assert token_deadline(2, 10.0, 6.0, 0.05, 20.0) == pytest.approx(20.05)
    assert token_deadline(1, 10.0, 6.0, 0.05, 20.0) == 16.0   # the first token's own deadline does not move


def test_request_uses_rule():
    r = req(0, 5.0, 100, tier="Q2")
    assert r.first_token_deadline_s == pytest.approx(5 + 594)
    r.first_token_s = 7.0
    assert r.token_deadline(3) == pytest.approx(5 + 594 + 2 * 0.4)


def test_tier_validation():
    with pytest.raises(ValueError, match="both TTFT and TBT"):
        Tier("X", ttft_s=1.0)
    with pytest.raises(ValueError, match="either"):
        Tier("X", ttft_s=1.0, tbt_s=0.05, ttlt_s=10.0)
    with pytest.raises(ValueError, match="> 0"):
        Tier("X", ttlt_s=0.0)
    assert Priority.parse("low") is Priority.LOW
    with pytest.raises(ValueError, match="unknown priority"):
        Priority.parse("urgent")


def test_tiers_from_json_and_mix(tmp_path):
    f = tmp_path / "tiers.json"
    f.write_text(json.dumps([{"name": "chat", "ttft_ms": 2000, "tbt_ms": 40}, {"name": "batch", "ttlt_ms": 3600000}]))
    chat, batch = load_tiers(str(f))
    assert chat.interactive and chat.tbt_s == pytest.approx(0.04)
    assert not batch.interactive and batch.ttlt_s == 3600
    with pytest.raises(ValueError, match="unknown tier set"):
        load_tiers("nope")
    assert parse_mix("70,15,15", 3) == pytest.approx((0.7, 0.15, 0.15))
    assert parse_mix(None, 3) == pytest.approx((1 / 3,) * 3)
    with pytest.raises(ValueError):
        parse_mix("1,2", 3)
