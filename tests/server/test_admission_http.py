"""Admission control over real HTTP: `niyama serve --on-infeasible reject` answers a request whose deadline it
predicts it cannot meet with a 429 (Retry-After, OpenAI's error shape), streamed or not, before any response
starts; feasible requests are served; the rejection is counted in /metrics and holds no KV block."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

from test_server import MODEL, chat, start_server, stop_server, wait_all_blocks_free  # noqa: E402

# A first token 1 ms after arrival: no prompt's prefill is that fast at the 8500 tokens/s the scheduler assumes
# before it has measured anything, nor at what this CPU does.
HOPELESS = {"ttft_ms": 1, "tbt_ms": 1000}
EASY = {"ttft_ms": 600_000, "tbt_ms": 60_000}


@pytest.fixture(scope="module")
def rejecting(tmp_path_factory):
    url, proc = start_server(tmp_path_factory, "--on-infeasible", "reject")
    yield url
    stop_server(proc)


def rejections(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.labels["tier"]: s.value for f in parser.text_string_to_metric_families(text)
            if f.name == "niyama:rejections" for s in f.samples if s.name.endswith("_total")}


@pytest.mark.parametrize("stream", [False, True])
def test_an_infeasible_deadline_gets_a_429_before_any_response(rejecting, stream):
    before = rejections(rejecting).get("custom", 0)
    body = {"messages": chat("Write a long essay about the sea."), "max_tokens": 8, "stream": stream, **HOPELESS}
    r = httpx.post(f"{rejecting}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 429
    assert r.headers["content-type"].startswith("application/json")     # not an event stream that says 200
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "deadline_infeasible"
    assert "TTFT target of 0.001 s" in err["message"] and "retry in" in err["message"]
    assert rejections(rejecting)["custom"] == before + 1
    health, _ = wait_all_blocks_free(rejecting, 5)
    assert health["kv_blocks_free"] == health["kv_blocks"]


def test_feasible_requests_are_served_and_the_openai_client_sees_a_rate_limit_error(rejecting):
    client = openai.OpenAI(base_url=f"{rejecting}/v1", api_key="unused", max_retries=0)
    ok = client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"),
                                        max_tokens=8, extra_body=EASY)
    assert ok.choices[0].message.content and ok.usage.completion_tokens >= 1
    parts = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, stream=True,
                                      extra_body={"tier": "Q1"})
    assert "".join(p.choices[0].text for p in parts if p.choices)
    with pytest.raises(openai.RateLimitError) as caught:   # ~300 prompt tokens: no prefill rate does them in 1 ms
        client.completions.create(model=MODEL, prompt="Hello " * 300, max_tokens=4, extra_body=HOPELESS)
    assert caught.value.code == "deadline_infeasible"


def test_without_reject_the_same_request_is_accepted_and_relegated(tmp_path_factory):
    url, proc = start_server(tmp_path_factory)           # default: on_infeasible = relegate
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, **HOPELESS}, timeout=60)
        assert r.status_code == 200
        assert r.json()["niyama"]["relegated"] is True
        assert rejections(url) == {t: 0.0 for t in ("Q1", "Q2", "Q3")}
    finally:
        stop_server(proc)


def test_bench_serve_counts_rejections_apart(rejecting, tmp_path):
    """A tier set the server does not know goes out as explicit targets; its 1 ms TTFT tier is refused."""
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps([{"name": "instant", "ttft_ms": 1, "tbt_ms": 1000},
                                 {"name": "batch", "ttlt_ms": 600_000}]))
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "bench", "serve", "--url", rejecting, "--trace",
                        "azure-conv", "--qps", "4", "--requests", "10", "--tiers", str(tiers), "--tier-mix", "50,50",
                        "--max-prompt-tokens", "32", "--max-output-tokens", "4", "--out", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_tier = {t["name"]: t for t in summary["tiers"]}
    assert by_tier["instant"]["rejected"] == by_tier["instant"]["count"] > 0     # every one of them
    assert by_tier["batch"]["rejected"] == 0 and summary["failed"] == 0
    assert f"{summary['rejected']} of 10 requests were rejected at arrival" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "records.csv")))
    assert sum(row["rejected"] == "True" for row in rows) == summary["rejected"]
