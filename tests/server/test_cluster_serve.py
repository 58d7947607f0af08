"""`niyama serve --replicas 2` as users reach it: a local Ray instance, two CPU engine replicas of the default model
(SmolLM2-135M) behind one OpenAI endpoint on 127.0.0.1, real HTTP; and the metrics merge on its own (no Ray). The
routing rules: tests/cluster/test_routing.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

from niyama.server.remote_engine import merge_metrics  # noqa: E402

MODEL = "smollm2-135m-instruct"
KV_TOKENS = 4096


# --- the metrics merge -----------------------------------------------------------------------------------------
def test_merged_metrics_label_each_replica_and_parse():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    def replica_text(n: int) -> bytes:
        r = CollectorRegistry()
        Counter("niyama:request_success", "done", ["finished_reason"], registry=r).labels("stop").inc(n)
        Histogram("niyama:ttft_seconds", "ttft", ["tier"], registry=r, buckets=(0.1, 1.0)).labels("Q1").observe(0.5)
        return generate_latest(r)

    text = merge_metrics({"r1": replica_text(2), "r2": replica_text(3)}).decode()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    done = {s.labels["replica"]: s.value for s in families["niyama:request_success"].samples
            if s.name.endswith("_total")}
    assert done == {"r1": 2.0, "r2": 3.0}
    counts = [s for s in families["niyama:ttft_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["replica"] for s in counts} == {"r1", "r2"}
    assert families["niyama:replicas"].samples[0].value == 2
    assert text.count("# TYPE niyama:ttft_seconds histogram") == 1       # one family, both replicas' samples


def test_without_ray_the_error_names_the_extra():
    from niyama.cli import import_hint

    assert "pip install 'niyama[cluster]'" in import_hint(ModuleNotFoundError("No module named 'ray'", name="ray"))
    code = "import sys, niyama.cli; sys.exit('ray' in sys.modules)"   # no Ray at import
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def entry(age_s: float, degraded: str | None = None):
    from niyama.messages import BoardEntry, ReplicaReport, ReplicaStatus

    return BoardEntry(age_s, ReplicaReport(1, 2, "127.0.0.1", ReplicaStatus(10, 16, degraded, 0, 0), None, b""))


def test_health_degrades_while_a_replica_is_missing_and_stops_when_none_reports():
    from niyama.server.remote_engine import RemoteEngine

    engine = RemoteEngine(None, None, {}, None, replicas=2, stale_s=0.05)
    engine._take({"a": entry(0.01), "b": entry(0.02)})
    assert engine.alive and engine.stats.degraded is None and engine.stats.kv_blocks == 32
    engine._take({"a": entry(0.01), "b": entry(5.0)})             # b silent: still on the board, not live
    assert engine.alive and engine.stats.kv_blocks == 16
    assert "1 of 2 engine replicas" in engine.stats.degraded and "replica b: no report for 5 s" in engine.stats.degraded
    engine._take({"a": entry(0.01)})                              # b forgotten by the board
    assert engine.alive and "1 of 2 engine replicas" in engine.stats.degraded
    engine._take({"a": entry(0.01, "2 KV blocks lost"), "b": entry(0.01)})
    assert engine.stats.degraded == "replica a: 2 KV blocks lost"
    engine._take({"a": entry(0.01), "b": entry(0.01)})
    assert engine.stats.degraded is None
    engine._take({"a": entry(5.0), "b": entry(5.0)})              # none healthy: /health answers 503
    time.sleep(0.1)
    engine._take({"a": entry(5.1), "b": entry(5.1)})
    assert not engine.alive and "no engine replica" in engine.stopped
    engine._take({"a": entry(0.01), "b": entry(0.01)})
    assert engine.alive and engine.stats.degraded is None


# --- the cluster over HTTP -------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")         # the test extra installs it (niyama[cluster])
    port = free_port()
    log = tmp_path_factory.mktemp("cluster") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}     # a local instance of its own
    started = time.monotonic()
    with open(log, "w") as out:
        # a shipped profile: no start-up measurement, which two replicas on 2 cores would slow each other in
        proc = subprocess.Popen([sys.executable, "-m", "niyama.cli", "serve", "--replicas", "2", "--port", str(port),
                                 "--kv-tokens", str(KV_TOKENS), "--profile", "a100-llama3-8b",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        # ~35 s on a 2-core machine running only this; a loaded one has taken over 4 minutes
        wait_for(lambda: len(replicas(url)) == 2, 480, "two replicas reporting", proc, log)
        print(f"cluster ready after {time.monotonic() - started:.1f} s")
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        print(log.read_text()[-4000:])
        assert code == 0


def wait_for(ok, limit_s: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if ok():
                return
        except (httpx.TransportError, httpx.HTTPStatusError, KeyError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited (code {proc.returncode}):\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {limit_s} s" + (f":\n{log.read_text()[-6000:]}" if log else ""))
        time.sleep(0.3)


def replicas(url: str) -> list[dict]:
    r = httpx.get(f"{url}/replicas", timeout=10)
    r.raise_for_status()
    return r.json()["data"]


def per_replica(url: str, name: str, **labels) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
    return out


def all_blocks_free(url: str) -> bool:
    health = httpx.get(f"{url}/health", timeout=10).json()
    reps = replicas(url)
    return (len(reps) == 2 and all(r["kv_blocks_free"] == r["kv_blocks"] for r in reps)
            and health["kv_blocks_free"] == health["kv_blocks"] == 2 * KV_TOKENS // 16)


def finished(url: str) -> float:
    return sum(per_replica(url, "niyama:request_success_total").values())


def test_replicas_draw_from_different_random_streams(cluster):
    """Identical unseeded requests at temperature 1 sent to both replicas at once: each replica draws the seeds
    of requests that give none from a stream of its own, so the pairs differ. (Runs first on fresh replicas: with
    one stream shared, each pair would be the same text.)"""
    url, _ = cluster
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    before = per_replica(url, "niyama:request_success_total")

    def one(_):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    texts: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            texts += pool.map(one, range(2))
    wait_for(lambda: finished(url) - sum(before.values()) >= 6, 10, "metrics of the 6 requests")
    after = per_replica(url, "niyama:request_success_total")
    assert len(after) == 2 and all(after[r] > before.get(r, 0) for r in after), (before, after)   # both served
    assert len(set(texts)) >= 5, texts


def test_a_local_ray_instance_listens_on_loopback_only(cluster):
    """Ray has no authentication worth the name: every socket the server's processes (Ray's GCS, raylet, agents,
    workers, Serve's proxy and replicas, the engines) listen on is a loopback one."""
    import ipaddress

    psutil = pytest.importorskip("psutil")
    _, proc = cluster
    server = psutil.Process(proc.pid)
    listening = []
    for p in [server, *server.children(recursive=True)]:
        try:
            listening += [(p.pid, p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:         # gone meanwhile
            pass

    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip.split("%")[0])
        return (a.ipv4_mapped or a).is_loopback if a.version == 6 else a.is_loopback

    assert any(port for *_, port in listening)          # the HTTP proxy at least
    exposed = [s for s in listening if not loopback(s[2])]
    assert not exposed, exposed


def test_requests_spread_over_both_replicas_with_per_replica_metrics(cluster):
    url, _ = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]
    before = finished(url)
    for i in range(3):
        r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           extra_body={"tier": "Q3", "priority": "low"})
        assert r.model_extra["niyama"] == {"tier": "Q3", "priority": "low", "relegated": False}
    wait_for(lambda: finished(url) - before >= 6, 10, "metrics of the 6 requests")
    counts = per_replica(url, "niyama:request_success_total")
    assert len(counts) == 2 and all(n >= 1 for n in counts.values()), counts     # both replicas served some
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert "niyama:replicas 2.0" in text and text.count("# TYPE niyama:time_to_first_token_seconds histogram") == 1
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["engine"]["mode"] == "ray-serve"
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "tier": "Q9"}, timeout=30)      # answered
    assert bad.status_code == 400 and "Q9" in bad.json()["error"]["message"]                       # at the ingress


def test_streaming_and_a_busy_replica_is_avoided_and_a_disconnect_frees_its_blocks(cluster):
    url, _ = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = finished(url)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"service_tier": "flex"}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    # the replicas' metrics reach /metrics every 0.5 s: let this request's count in before the baselines below
    wait_for(lambda: finished(url) >= before + 1, 10, "the chat request's metrics")
    aborts = per_replica(url, "niyama:request_success_total", finished_reason="abort")
    body = {"prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = (line for line in resp.iter_lines() if line.startswith("data:"))
        next(lines)
        busy: list[str] = []
        wait_for(lambda: busy.extend(r["replica"] for r in replicas(url) if r["running"] or r["waiting"]) or busy,
                 10, "the long request's replica reporting it")        # reports come every 0.5 s
        time.sleep(1.0)          # two more report periods: the routers' view of the load is as fresh
        done = per_replica(url, "niyama:request_success_total")
        for _ in range(3):       # the qos router sends short requests to the replica without the long one
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        wait_for(lambda: finished(url) - sum(done.values()) >= 3, 10, "metrics of the 3 short requests")
        after = per_replica(url, "niyama:request_success_total")
        assert busy and all(after.get(r, 0) == done.get(r, 0) for r in busy), (busy, done, after)
        for _ in range(3):
            next(lines)
    # leaving the block closed the connection: the request is aborted on its replica and its blocks return
    wait_for(lambda: all_blocks_free(url), 15, "every KV block free after the disconnect")
    wait_for(lambda: sum(per_replica(url, "niyama:request_success_total", finished_reason="abort").values())
             - sum(aborts.values()) == 1, 10, "the abort counted")


def test_a_non_streaming_client_that_leaves_is_aborted_too(cluster):
    url, _ = cluster
    aborts = sum(per_replica(url, "niyama:request_success_total", finished_reason="abort").values())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "Count.", "max_tokens": 400, "ignore_eos": True},
                   timeout=httpx.Timeout(30, read=2))
    wait_for(lambda: sum(per_replica(url, "niyama:request_success_total", finished_reason="abort").values())
             - aborts == 1, 15, "the abort counted")
    wait_for(lambda: all_blocks_free(url), 15, "every KV block free")


def stream_events(url: str, started: threading.Event) -> dict:
    """One long streamed completion: its data lines, whether an error event came, its finish reason."""
    body = {"prompt": "Tell me a long story.", "max_tokens": 80, "ignore_eos": True, "stream": True}
    out = {"chunks": 0, "error": None, "finish": None, "done": False, "transport": None}
    try:
        with httpx.Client(timeout=httpx.Timeout(60, read=30)) as c, \
                c.stream("POST", f"{url}/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out["error"] = event["error"]["message"]
                else:
                    out["chunks"] += 1
                    out["finish"] = event["choices"][0]["finish_reason"] or out["finish"]
                started.set()
    except httpx.TransportError as e:      # a cut connection is an acceptable end too; a hang is not
        out["transport"] = repr(e)
    out["ended"] = time.monotonic()
    return out


def test_a_killed_replica_fails_its_streams_and_is_replaced(cluster):
    url, _ = cluster
    flags = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream_events, url, flag) for flag in flags]
        assert all(flag.wait(60) for flag in flags)
        wait_for(lambda: all(r["running"] for r in replicas(url)), 10, "both replicas running a stream")
        victim = replicas(url)[0]
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        # /health: degraded (still 200) while one of the two replicas is gone, naming it
        wait_for(lambda: (h := httpx.get(f"{url}/health", timeout=10).json())["status"] == "degraded"
                 and "1 of 2 engine replicas" in h["reason"] and victim["replica"] in h["reason"],
                 15, "/health degraded after the kill")
        results = [f.result(timeout=120) for f in futures]
    failed = [r for r in results if r["error"] or r["transport"]]
    ok = [r for r in results if r["finish"] == "length" and r["chunks"] == 81 and r["done"]]    # + the last
    assert len(failed) == 1 and len(ok) == 1, results
    assert failed[0]["error"] is None or "replica" in failed[0]["error"]
    failed_s = failed[0]["ended"] - t0
    assert failed_s < 15          # told at once (Ray reports the actor's death), not left hanging
    wait_for(lambda: len(reps := replicas(url)) == 2 and victim["replica"] not in {r["replica"] for r in reps},
             120, "a replacement replica")
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok", 10, "/health ok again")
    wait_for(lambda: all_blocks_free(url), 15, "every KV block free")
    print(f"the killed replica's stream ended {failed_s:.1f} s after the kill, the other "
          f"{ok[0]['ended'] - t0:.1f} s after; replaced after {time.monotonic() - t0:.1f} s")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
