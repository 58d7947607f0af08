"""Faults of the engine process, against a real server on 127.0.0.1 (default model, CPU): the engine
killed mid-stream, and a short overload soak (the full one is `python benchmarks/soak.py`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from test_server import start_server, stop_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import soak  # noqa: E402


def test_killing_the_engine_process_fails_its_streams_and_refuses_new_requests(tmp_path_factory):
    url, handle = start_server(tmp_path_factory)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["engine"]["mode"] == "process" and health["engine"]["pid"] != handle[0].pid
        body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert sum(next(lines).startswith("data:") for _ in range(6)) >= 3
            os.kill(health["engine"]["pid"], signal.SIGKILL)
            rest = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x != "data: [DONE]"]
        assert "engine process exited" in rest[-1]["error"]["message"]
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
        assert "engine process exited" in refused.json()["error"]["message"]
        down = httpx.get(f"{url}/health", timeout=10)
        assert down.status_code == 503 and "restart" in down.json()["error"]["message"]
        assert handle[0].poll() is None          # the HTTP side still answers
    finally:
        code = stop_server(handle)
    assert code == 0                             # and shuts down cleanly


def test_a_short_overload_soak_loses_nothing(tmp_path_factory):
    url, handle = start_server(tmp_path_factory, "--max-queued", "24")
    try:
        report = soak.run(url, seconds=25, qps=4.0, seed=1)
    finally:
        code = stop_server(handle)
    assert code == 0                             # SIGTERM: a clean shutdown exits 0, not 143
    print(json.dumps(report, indent=1))
    c = report["counts"]
    assert report["sent"] > 60 and c["5xx"] == 0 and c["other"] == 0
    assert c["completed"] + c["rejected"] + c["disconnected"] + c["hostile_4xx"] == report["sent"]
    assert c["completed"] > 0 and c["disconnected"] > 0 and c["hostile_4xx"] > 0
    assert report["blocks_free_at_end"], report["health_at_end"]
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in report["metrics"]
               if line.startswith("niyama:prefix_cache_hits_total"))
    assert hits > 0 and report["health_at_end"]["kv_blocks_cached"] > 0     # requests shared cached prefixes
