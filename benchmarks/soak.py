"""Overload soak: Poisson traffic above what the server sustains, for a bounded time, with clients that
leave mid-stream and hostile bodies mixed in. Checks that nothing is lost (every request sent is completed,
rejected with 429, left by its client, or refused with a 4xx when hostile), that no 5xx is answered, and
that every KV block is free at the end; reports RSS growth of the HTTP and engine processes.

    python benchmarks/soak.py --minutes 10 --qps 2          # starts `niyama serve` (default model, CPU)
    python benchmarks/soak.py --url http://127.0.0.1:8000 --minutes 1

Saves benchmarks/results/soak_<tag>.json. The test suite runs a 25-second version (tests/test_server_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
# every prompt starts with the same preamble (several 16-token blocks), so requests share cached prefixes while
# clients leave and requests are refused: the prefix cache's accounting is soaked too
PREAMBLE = ("You are a concise assistant for a travel agency. Answer in plain sentences, avoid lists unless asked, "
            "and say so when you do not know. ")
PROMPTS = ("Tell me about the sea.", "Write a haiku about autumn.", "What is 17 times 23?",
           "Explain what a KV cache is in one paragraph.", "List three fruits.", "Describe a busy train station.")
HOSTILE = (  # (body, content type): each must get a 4xx
    (b'{"prompt": "Hi", "max_tokens": 4, "temperature": 1e-40}', "application/json"),
    (b'{"prompt": "Hi", "max_tokens": -3}', "application/json"),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "application/json"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
    (b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "application/json"),
    (b'{"prompt": "Hi"', "application/json"),
    (b'{"prompt": "Hi"}', "text/plain"),
)
KINDS = ("completed", "rejected", "disconnected", "hostile_4xx", "5xx", "other")


def rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return None


async def one_request(c: httpx.AsyncClient, url: str, rng: random.Random, counts: dict, notes: list) -> None:
    roll = rng.random()
    try:
        if roll < 0.05:
            body, kind = rng.choice(HOSTILE)
            r = await c.post(f"{url}/v1/completions", content=body, headers={"Content-Type": kind})
            key = "hostile_4xx" if 400 <= r.status_code < 500 else "5xx" if r.status_code >= 500 else "other"
            if key != "hostile_4xx":
                notes.append(f"hostile body {body[:40]!r} got {r.status_code}")
            counts[key] += 1
            return
        body = {"prompt": PREAMBLE + rng.choice(PROMPTS), "max_tokens": rng.randint(8, 48), "temperature": rng.choice((0, 0.8)),
                "tier": rng.choice(("Q1", "Q1", "Q2", "Q3"))}
        if roll < 0.15:        # a client that leaves after a few chunks
            async with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                                        "max_tokens": 200, "ignore_eos": True}) as r:
                if r.status_code != 200:
                    counts["rejected" if r.status_code == 429 else "5xx" if r.status_code >= 500 else "other"] += 1
                    return
                n, leave = 0, rng.randint(1, 6)
                async for line in r.aiter_lines():
                    n += line.startswith("data:")
                    if n >= leave:
                        break
            counts["disconnected"] += 1
            return
        stream = rng.random() < 0.4
        if stream:
            async with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    status = r.status_code
                else:
                    lines = [x async for x in r.aiter_lines() if x.startswith("data:")]
                    status = 200 if lines and lines[-1] == "data: [DONE]" and "error" not in lines[-2] else 500
        else:
            r = await c.post(f"{url}/v1/completions", json=body)
            status = r.status_code
            if status == 200 and r.json()["niyama"]["relegated"]:
                counts["relegated"] = counts.get("relegated", 0) + 1
        key = ("completed" if status == 200 else "rejected" if status == 429 else "5xx" if status >= 500
               else "other")
        if key not in ("completed", "rejected"):
            notes.append(f"request {body} got {status}")
        counts[key] += 1
    except httpx.HTTPError as e:
        counts["other"] += 1
        notes.append(f"{type(e).__name__}: {e}")


async def run_async(url: str, seconds: float, qps: float, seed: int, api_pid: int | None) -> dict:
    rng = random.Random(seed)
    counts = dict.fromkeys(KINDS, 0)
    notes: list[str] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        engine_pid = (await c.get(f"{url}/health")).json()["engine"]["pid"]
        rss = [(0.0, rss_mib(api_pid), rss_mib(engine_pid))]
        tasks = []
        start = time.monotonic()
        next_sample = 10.0
        while (now := time.monotonic() - start) < seconds:
            tasks.append(asyncio.create_task(one_request(c, url, rng, counts, notes)))
            if now >= next_sample:
                rss.append((round(now, 1), rss_mib(api_pid), rss_mib(engine_pid)))
                next_sample += 10
            await asyncio.sleep(rng.expovariate(qps))
        sent = len(tasks)
        await asyncio.gather(*tasks)
        drain_s = time.monotonic() - start - seconds
        rss.append((round(time.monotonic() - start, 1), rss_mib(api_pid), rss_mib(engine_pid)))
        for _ in range(100):                 # the last aborts land at the engine's next pause
            health = (await c.get(f"{url}/health")).json()
            if health["kv_blocks_free"] == health["kv_blocks"]:
                break
            await asyncio.sleep(0.1)
        metrics = (await c.get(f"{url}/metrics")).text
    keep = ("niyama:tier_requests_total", "niyama:tier_violations_total", "niyama:relegations_total",
            "niyama:num_preemptions_total", "niyama:request_success_total", "niyama:iteration_duration_seconds_count",
            "niyama:iteration_duration_seconds_sum", "niyama:prefix_cache_hits_total", "niyama:prefix_cache_queries_total")
    return {"url": url, "seconds": seconds, "qps": qps, "seed": seed, "sent": sent, "counts": counts,
            "drain_s": round(drain_s, 1), "rss_mib": rss, "health_at_end": health,
            "blocks_free_at_end": health["kv_blocks_free"] == health["kv_blocks"], "notes": notes[:20],
            "metrics": [line for line in metrics.splitlines() if line.startswith(keep)]}


def run(url: str, seconds: float, qps: float, seed: int = 0, api_pid: int | None = None) -> dict:
    return asyncio.run(run_async(url, seconds, qps, seed, api_pid))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start `niyama serve` on a free port)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--qps", type=float, default=2.0, help="arrival rate (default 2: about 2x what the default "
                                                           "model sustains on a 2-core CPU with this mix)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra `niyama serve` arguments when starting one")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = open(Path(args.out) / f"soak_{args.tag}.server.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "niyama.cli", "serve", "--port", str(port), "--log-level",
                                 "warning", *args.serve_args.split()], stdout=log, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
    try:
        report = run(url, args.minutes * 60, args.qps, args.seed, proc.pid if proc else None)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    c = report["counts"]
    ok = (c["5xx"] == 0 and c["other"] == 0 and report["blocks_free_at_end"]
          and c["completed"] + c["rejected"] + c["disconnected"] + c["hostile_4xx"] == report["sent"])
    report["ok"] = ok
    first, last = report["rss_mib"][0], report["rss_mib"][-1]
    print(f"sent {report['sent']} in {report['seconds']:.0f} s at {args.qps} QPS: {c}; drain {report['drain_s']} s; "
          f"blocks free at end: {report['blocks_free_at_end']}")
    print(f"RSS MiB (t, http, engine): start {first}, end {last}")
    for line in report["notes"]:
        print("  note:", line)
    path = Path(args.out) / f"soak_{args.tag}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"{'OK' if ok else 'FAILED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
