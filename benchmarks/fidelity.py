"""Does the simulator agree with the engine? The same workload and seed through `niyama replay` (the real engine,
in real time) and `niyama simulate` (the batch-time profile's clock), side by side: each replayed step's
measured time against the profile's prediction, per-tier TTFT / TBT p50 and p99, violations and goodput.

    python benchmarks/fidelity.py --model llama-3-8b --load-format dummy --device cuda \\
        --profile h100-llama3-8b --point azure-conv:4.0 --point sharegpt:1.5 --minutes 2
    python benchmarks/fidelity.py --point azure-conv:0.5 --minutes 1 --max-prompt-tokens 256 \\
        --max-output-tokens 32 --profile measure --tag cpu          # CPU, the default model
    python benchmarks/fidelity.py ... --sampling chat               # what chat clients send (t 0.7, top_p 0.9)

Each --point is TRACE:QPS; the run sends QPS x 60 x MINUTES requests. Saves
benchmarks/results/fidelity_<tag>.json and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import random

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.metrics import summarize  # noqa: E402
from niyama.metrics.summary import RunSummary  # noqa: E402
from niyama.engine.sampling import SamplingMix  # noqa: E402
from niyama.predictor import load_profile  # noqa: E402
from niyama.predictor.fit import read_steps, sampled  # noqa: E402
from niyama.sim import simulate  # noqa: E402
from niyama.workload import make_workload  # noqa: E402


def niyama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], text=True, capture_output=True)


def simulated(trace: str, qps: float, n: int, seed: int, records_csv: Path, profile: str,
              sampled_share: float = 0.0) -> RunSummary:
    """The replay's workload (same seed; each request's lengths as the replay ran them, after clipping to the
    model and the KV cache) through the simulator, planning and timed with `profile`; `sampled_share` of the
    requests sample (all or none for a single setting such as chat; a seeded draw for a mix)."""
    wl = make_workload(trace, qps, num_requests=n, seed=seed)
    with open(records_csv) as f:
        ran = {int(r["request_id"]): (int(r["prompt_tokens"]), int(r["output_tokens"])) for r in csv.DictReader(f)}
    rng = random.Random(seed)
    specs = [replace(s, num_prompt_tokens=ran[i][0], num_output_tokens=ran[i][1],
                     sampled=rng.random() < sampled_share) for i, s in enumerate(wl.specs)]
    summary, _ = summarize(simulate(replace(wl, specs=specs), "niyama", profile=profile))
    return summary


def step_errors(steps_csv: Path, profile) -> np.ndarray:
    """Signed relative error of the profile's prediction for every replayed step."""
    rows = read_steps(steps_csv)
    pred = np.array([profile.batch_time(*r[:4], sampled(r)) for r in rows])
    meas = np.array([r[4] for r in rows])
    return (pred - meas) / meas


def goodput(summary: dict) -> float:
    admitted = summary["num_requests"] - summary.get("rejected", 0)
    on_time = admitted - round(admitted * summary["violation_pct"] / 100)
    return on_time / max(summary["makespan_s"], 1e-9)


def compare(sim: dict, real: dict) -> dict:
    """Per tier: (simulated, replayed) p50 / p99 of TTFT and TBT; overall violations and goodput."""
    out = {"tiers": {}}
    for ts, tr in zip(sim["tiers"], real["tiers"]):
        out["tiers"][ts["name"]] = {f"{m}_{q}": (ts[f"{m}_s"][i], tr[f"{m}_s"][i])
                                    for m in ("ttft", "tbt") for q, i in (("p50", 0), ("p99", 2))}
    for key in ("violation_pct", "strict_violation_pct"):
        out[key] = (sim[key], real[key])
    out["goodput_rps"] = (goodput(sim), goodput(real))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", action="append", required=True, metavar="TRACE:QPS")
    ap.add_argument("--minutes", type=float, default=2.0, help="minutes of arrivals per point (default 2)")
    ap.add_argument("--profile", required=True, help="the profile both sides plan with (and the simulator's clock)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-prompt-tokens", default=None)
    ap.add_argument("--max-output-tokens", default=None)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--sampling", default="greedy", help="the replay's --sampling (greedy, chat, ... or a JSON mix)")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    profile = load_profile(args.profile) if args.profile != "measure" else None
    engine = ["--load-format", args.load_format, "--profile", args.profile]
    engine += [a for flag, v in (("--model", args.model), ("--device", args.device)) if v for a in (flag, v)]
    clip = [a for flag, v in (("--max-prompt-tokens", args.max_prompt_tokens),
                              ("--max-output-tokens", args.max_output_tokens)) if v for a in (flag, v)]
    clip += ["--sampling", args.sampling]
    sampled_share = SamplingMix.parse(args.sampling).sampled_share
    work = Path(args.out) / "fidelity_runs"
    path = Path(args.out) / f"fidelity_{args.tag or args.device or 'default'}.json"
    results = []
    for point in args.point:
        trace, _, qps = point.partition(":")
        n = max(20, round(float(qps) * 60 * args.minutes))
        workload = ["--trace", trace, "--qps", qps, "--requests", str(n), "--seed", args.seed]
        where = work / f"{trace}-{qps}-{args.sampling}"
        t0 = time.monotonic()
        real = niyama("replay", *workload, *engine, *clip, "--out", str(where / "replay"), "--quiet")
        wall = time.monotonic() - t0
        print(real.stdout, flush=True)
        if real.returncode:
            print(real.stderr[-3000:])
            return 1
        # measured at start-up: the replay's own fit of its steps stands in for it
        spec = args.profile if profile else str(where / "replay" / "profile.json")
        used = load_profile(spec)
        a = asdict(simulated(trace, float(qps), n, int(args.seed), where / "replay" / "records.csv", spec,
                             sampled_share))
        b = json.loads((where / "replay" / "summary.json").read_text())
        err = step_errors(where / "replay" / "steps.csv", used)
        row = {"trace": trace, "qps": float(qps), "requests": n, "sampling": args.sampling, "replay_wall_s": wall,
               "step_mape_pct": 100 * float(np.abs(err).mean()), "step_bias_pct": 100 * float(err.mean()),
               "step_p95_abs_err_pct": 100 * float(np.percentile(np.abs(err), 95)), "steps": len(err),
               "clipped": "clipped" in real.stdout, **compare(a, b)}
        results.append(row)
        print(f"{trace} @ {qps} QPS, {n} requests: per-step error of the profile MAPE {row['step_mape_pct']:.1f}% "
              f"(bias {row['step_bias_pct']:+.1f}%, p95 {row['step_p95_abs_err_pct']:.1f}%) over {len(err)} steps")
        print(f"  {'tier':<5} {'TTFT p50 sim/real (s)':>22} {'TTFT p99':>16} {'TBT p50 (ms)':>14} {'TBT p99':>12}")
        for name, t in row["tiers"].items():
            print(f"  {name:<5} {t['ttft_p50'][0]:>10.2f}/{t['ttft_p50'][1]:<11.2f} {t['ttft_p99'][0]:>7.2f}/"
                  f"{t['ttft_p99'][1]:<8.2f} {1e3 * t['tbt_p50'][0]:>6.0f}/{1e3 * t['tbt_p50'][1]:<7.0f} "
                  f"{1e3 * t['tbt_p99'][0]:>5.0f}/{1e3 * t['tbt_p99'][1]:<6.0f}")
        print(f"  violations sim/real {row['violation_pct'][0]:.2f}/{row['violation_pct'][1]:.2f}% (strict "
              f"{row['strict_violation_pct'][0]:.2f}/{row['strict_violation_pct'][1]:.2f}%), goodput "
              f"{row['goodput_rps'][0]:.3f}/{row['goodput_rps'][1]:.3f} req/s")
        path.write_text(json.dumps({"args": vars(args), "points": results}, indent=1))   # after each point
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
