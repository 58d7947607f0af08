"""The same workload two ways: `niyama replay` (engine in-process) and `niyama bench serve` against a
`niyama serve` process (real HTTP, timed on the client). The gap is what the server adds: HTTP,
the messages between the HTTP process and the engine process, SSE parsing on the client. Also compares the
engine's mean step time (replay's step log vs the server's niyama:iteration_duration_seconds).

    python benchmarks/serve_vs_replay.py --trace azure-conv --qps 1 --requests 40 \
        --max-prompt-tokens 256 --max-output-tokens 32                       # CPU, default model
    python benchmarks/serve_vs_replay.py --model llama-3-8b --load-format dummy --device cuda \
        --trace azure-conv --qps 2 --requests 200                            # GPU, Llama-3-8B shape

Prints both reports and a comparison; saves benchmarks/results/serve_vs_replay_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent


def niyama(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], text=True, capture_output=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def metrics_lines(url: str, prefixes: tuple[str, ...]) -> list[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--qps", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-prompt-tokens", default=None)
    ap.add_argument("--max-output-tokens", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--profile", default="a100-llama3-8b")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    engine_args = ["--load-format", args.load_format, "--profile", args.profile]
    for flag, value in (("--model", args.model), ("--device", args.device)):
        if value:
            engine_args += [flag, value]
    workload = ["--trace", args.trace, "--qps", str(args.qps), "--requests", str(args.requests), "--seed", args.seed]
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens), ("--max-output-tokens", args.max_output_tokens)):
        if value:
            workload += [flag, value]
    out = Path(args.out)
    work = out / "serve_vs_replay_runs"
    tag = args.tag or (args.device or "default")
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    replay = niyama("replay", *workload, *engine_args, "--out", str(work / "replay"), "--quiet")
    print(replay.stdout, replay.stderr[-2000:] if replay.returncode else "")
    replay_s = time.monotonic() - t0
    if replay.returncode:
        return 1

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "niyama.cli", "serve", "--port", str(port), "--log-level",
                               "warning", *engine_args], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        t0 = time.monotonic()
        bench = niyama("bench", "serve", "--url", url, *workload, "--out", str(work / "bench"), "--quiet")
        bench_s = time.monotonic() - t0
        print(bench.stdout, bench.stderr[-2000:] if bench.returncode else "")
        server_metrics = metrics_lines(url, ("niyama:tier_", "niyama:relegations_total", "niyama:chunk_size_tokens_sum",
                                             "niyama:chunk_size_tokens_count", "niyama:num_preemptions_total",
                                             "niyama:iteration_duration_seconds_sum",
                                             "niyama:iteration_duration_seconds_count"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    if bench.returncode:
        return 1

    a = json.loads((work / "replay" / "summary.json").read_text())
    b = json.loads((work / "bench" / "summary.json").read_text())
    rows = []
    print(f"\n{'tier':<5} {'':>8} {'TTFT p50/p99 s':>16} {'TBT p50/p99 ms':>16} {'TTLT p50/p99 s':>16} {'viol%':>6}")
    for ta, tb in zip(a["tiers"], b["tiers"]):
        for label, t in (("replay", ta), ("http", tb)):
            print(f"{t['name']:<5} {label:>8} {t['ttft_s'][0]:>7.2f}/{t['ttft_s'][2]:<8.2f} "
                  f"{t['tbt_s'][0] * 1000:>7.0f}/{t['tbt_s'][2] * 1000:<8.0f} {t['ttlt_s'][0]:>7.1f}/{t['ttlt_s'][2]:<8.1f} "
                  f"{t['violation_pct']:>6.2f}")
        rows.append({"tier": ta["name"], "replay": ta, "http": tb})
    print(f"overall violations: replay {a['violation_pct']:.2f}%, http {b['violation_pct']:.2f}%; makespan "
          f"replay {a['makespan_s']:.0f} s, http {b['makespan_s']:.0f} s; relegated {a['relegated']} / {b['relegated']}")
    engine_line = next(line for line in replay.stdout.splitlines() if line.startswith("engine:"))
    replay_step_ms = float(re.search(r"mean step ([0-9.]+) ms", engine_line).group(1))
    sums = {line.split("{")[0]: float(line.split()[-1]) for line in server_metrics
            if line.startswith("niyama:iteration_duration_seconds")}
    serve_step_ms = 1000 * sums["niyama:iteration_duration_seconds_sum"] / sums["niyama:iteration_duration_seconds_count"]
    print(f"mean step: replay {replay_step_ms:.2f} ms over {a['num_iterations']} steps, server {serve_step_ms:.2f} ms "
          f"over {sums['niyama:iteration_duration_seconds_count']:.0f} steps ({serve_step_ms / replay_step_ms - 1:+.1%}); "
          f"strict per-token violations: replay {a['strict_violation_pct']:.2f}%, http {b['strict_violation_pct']:.2f}%")
    result = {"mean_step_ms": {"replay": replay_step_ms, "serve": serve_step_ms},
              "strict_violation_pct": {"replay": a["strict_violation_pct"], "http": b["strict_violation_pct"]},
              "args": vars(args), "replay_wall_s": replay_s, "bench_wall_s": bench_s, "replay": a, "http": b,
              "server_metrics": server_metrics, "replay_engine_line": [l for l in replay.stdout.splitlines()
                                                                       if l.startswith(("engine:", "fitted"))]}
    path = out / f"serve_vs_replay_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
