"""Interactive chat beside an OpenAI-style batch job (issue 28, item 5).

OpenAI's Batch API gives a batch a `completion_window` (24 h); niyama turns it into each line's time-to-last-token
deadline, so the lines fill what the chat leaves of the GPU. This measures it on one replica:

1. chat capacity: the highest QPS whose chat requests (the default tier set's interactive tier, Q1: TTFT 6 s,
   TBT 50 ms) are at most 1% late (the goodput search of `niyama capacity`, 1-hour runs, and its sustainable
   check on 2-hour runs), per policy, on the shipped H100 Llama-3-8B profile;
2. chat alone at 80% of that for one hour: violations, TTFT/TBT percentiles, and the replica's busy time per step;
3. the same chat arrivals (common random numbers) plus a batch submitted at t=0: lines drawn from the same trace,
   as many tokens (prompt + output) as the hour of chat, in a TTLT tier of 24 h; run until the batch is done;
4. a control with a 30-minute window, which the batch cannot meet: how many lines miss it (the Batch API would
   report them `expired`), and what the chat pays;
5. the same for the Sarathi baselines fcfs and edf.

Two yardsticks for the batch's completion time:
- idle-time bound: the earliest T at which the GPU time chat alone leaves idle (wall time less the chat-alone
  run's step time, the GPU counted as fully idle after that run's end) adds up to the batch's own GPU time (the
  batch alone on an empty replica, back to back: its busy time). A scheduler that runs batch work only when no chat
  is in the GPU finishes no sooner.
- work bound: the chat's own GPU time at full occupancy (its requests all at t=0 on an empty replica) plus the
  batch's; no schedule finishes everything much sooner.

Simulated traffic: azure-conv lengths, Poisson arrivals, greedy step times (the profile's sampled-row term off);
prefix caching plays no part (the trace has no prefix block ids).

    python benchmarks/batch_colocation.py                # simulator: 3-5 min on 2 cores; results/batch_colocation.*
    python benchmarks/batch_colocation.py --capacity-from benchmarks/results/batch_colocation.json   # skip search

Engine mode: the same workload scaled to minutes, replayed in real time on the model engine
(niyama/engine/trace_replay.py), each part beside the simulator on the lengths the engine ran. Chat at 80% of the
simulated niyama capacity (from the simulator's JSON, or --qps), `--minutes` of it, a batch of as many tokens with
the windows scaled by minutes / 60 (24 h -> 72 min, 30 min -> 90 s at 3 minutes; a line's first-token deadline is
its window less 60 s, 150 predicted output tokens x 0.4 s, as in the simulator: 30 s into the 90 s). Parts: chat
(alone), batch (alone, for the idle bound), mixed (chat + batch, 24 h scaled), short (chat + batch, 30 min
scaled). On one H100, at 16.08 QPS (80% of 20.1) for 3 minutes: ~2,900 chat requests and a ~2,900-line batch;
the simulator expects chat 180 s + batch alone ~150 s, mixed ~290 s, short ~290 s, plus the model's load per
command, so each command below stays under the 10-minute limit (parts run apart merge into one JSON per --tag):

    python3 benchmarks/batch_colocation.py --engine --device cuda --model llama-3.1-8b --load-format dummy \\
        --tag h100 --parts chat,batch
    python3 benchmarks/batch_colocation.py --engine --device cuda --model llama-3.1-8b --load-format dummy \\
        --tag h100 --parts mixed
    python3 benchmarks/batch_colocation.py --engine --device cuda --model llama-3.1-8b --load-format dummy \\
        --tag h100 --parts short
    # CPU smoke run with the default model (SmolLM2-135M), all parts in ~1 minute:
    python benchmarks/batch_colocation.py --engine --tag cpu --minutes 0.1 --qps 1 --max-prompt-tokens 128 \\
        --max-output-tokens 16

Engine mode needs only torch and numpy (no server packages); it writes
benchmarks/results/batch_colocation_engine_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from niyama.metrics import summarize  # noqa: E402
from niyama.qos import TIER_PRESETS, Tier  # noqa: E402
from niyama.sim import simulate  # noqa: E402
from niyama.sim.run import DEFAULT_KV_TOKENS  # noqa: E402
from niyama.workload import Workload, make_workload  # noqa: E402
from niyama.workload.build import clip_lengths  # noqa: E402

TRACE = "azure-conv"
PROFILE = "h100-llama3-8b"
CHAT = TIER_PRESETS["default"][0]            # Q1: TTFT 6 s, TBT 50 ms
HOUR = 3600.0
WINDOW_S = 24 * HOUR                        # the Batch API's completion_window
SHORT_WINDOW_S = 0.5 * HOUR                 # a window the batch cannot meet
LOAD_FRACTION = 0.8
BATCH_SEED_OFFSET = 1000                    # the batch's lengths come from another stream than the chat's


# --- workloads ---------------------------------------------------------------

def batch_tier(window_s: float) -> Tier:
    return Tier("batch", ttlt_s=window_s)


def chat_workload(qps: float, duration_s: float, seed: int = 0) -> Workload:
    return make_workload(TRACE, qps, duration_s=duration_s, seed=seed, tiers=(CHAT,))


def tokens_of(specs) -> int:
    return sum(s.num_prompt_tokens + s.num_output_tokens for s in specs)


def batch_specs(total_tokens: int, window_s: float, seed: int = 0, arrival_s: float = 0.0,
                max_prompt_tokens: int | None = None, max_output_tokens: int | None = None) -> list:
    """Lines drawn from the trace's lengths (their own seeded stream) until they hold `total_tokens` tokens
    (prompt + output, after the optional caps), all arriving at `arrival_s`, in the batch tier."""
    tr_mean = None
    n = 64
    while True:
        wl = make_workload(TRACE, 1.0, num_requests=n, seed=seed + BATCH_SEED_OFFSET, tiers=(batch_tier(window_s),))
        specs, total = [], 0
        for s in wl.specs:
            if total >= total_tokens:
                break
            p, o = clip_lengths(s, 10 ** 9, max_prompt_tokens, max_output_tokens)
            specs.append(replace(s, arrival_s=arrival_s, num_prompt_tokens=p, num_output_tokens=o))
            total += p + o
        if total >= total_tokens:
            return specs
        tr_mean = tr_mean or max(1.0, total / len(specs))
        n = int(1.2 * total_tokens / tr_mean) + 64 if n == 64 else 2 * n


def with_batch(chat: Workload, specs: list, window_s: float) -> Workload:
    """The chat workload plus the batch lines, in arrival order (the batch first at equal times)."""
    tier = batch_tier(window_s)
    merged = sorted(specs + list(chat.specs), key=lambda s: s.arrival_s)     # stable: batch lines before chat
    return Workload(f"{chat.name}+batch", merged, chat.tiers + (tier,), chat.rule, chat.long_prompt_threshold,
                    chat.qps, chat.block_tokens)


def alone(specs: list, window_s: float, like: Workload, name: str) -> Workload:
    """`specs` alone, all at t=0, in a batch tier (the batch alone; the chat's requests as one batch)."""
    tier = batch_tier(window_s)
    specs = [replace(s, arrival_s=0.0, tier=tier.name) for s in specs]
    return Workload(name, specs, (tier,), like.rule, like.long_prompt_threshold, None, like.block_tokens)


# --- what a run reports -------------------------------------------------------------------------------

def tier_row(t, ttft_max: float) -> dict:
    return {"count": t.count, "violation_pct": round(t.violation_pct, 4), "ttft_max_s": round(ttft_max, 3),
            "strict_violation_pct": round(t.strict_violation_pct, 4), "relegated": t.relegated,
            "ttft_p50_s": round(t.ttft_s[0], 4), "ttft_p99_s": round(t.ttft_s[2], 4),
            "tbt_p50_ms": round(1000 * t.tbt_s[0], 2), "tbt_p99_ms": round(1000 * t.tbt_s[2], 2),
            "ttlt_p50_s": round(t.ttlt_s[0], 2), "ttlt_p99_s": round(t.ttlt_s[2], 2)}


def report(result, steps: list[tuple[float, float]], keep_steps: bool = False) -> dict:
    """Per-tier numbers, busy time and, for the batch tier, its completion. `steps`: (end, duration) per step."""
    summary, rec = summarize(result)
    ends = np.array([e for e, _ in steps])
    durations = np.array([d for _, d in steps])
    makespan = float(ends[-1]) if len(ends) else 0.0
    out = {"requests": summary.num_requests, "makespan_s": round(makespan, 3), "steps": len(steps),
           "busy_s": round(float(durations.sum()), 3), "preemptions": summary.preemptions,
           "tiers": {t.name: tier_row(t, float(np.nanmax(rec["ttft_s"][rec["tier"] == t.name], initial=0.0)))
                     for t in summary.tiers}}
    out["idle_s"] = round(max(0.0, makespan - out["busy_s"]), 3)
    batch = [r for r in result.requests if r.tier.name == "batch"]
    if batch:
        window = batch[0].tier.ttlt_s
        finish = np.array([r.finish_s for r in batch])
        first = min(r.arrival_s for r in batch)
        out["batch"] = {"lines": len(batch), "tokens": sum(r.num_prompt_tokens + r.num_output_tokens for r in batch),
                        "window_s": window, "completion_s": round(float(finish.max()) - first, 3),
                        "missed": int(np.count_nonzero(finish - first > window)),
                        "done_in_window": int(np.count_nonzero(finish - first <= window))}
    if keep_steps:
        out["_steps"] = (ends, durations)
    return out


def idle_bound(ends: np.ndarray, durations: np.ndarray, need_s: float, start_s: float = 0.0) -> float:
    """The earliest time at which the idle time of a run (from `start_s`, between and after its steps, the
    replica counted idle for good after its last step) adds up to `need_s`."""
    starts = ends - durations
    prev = np.concatenate([[start_s], ends[:-1]])
    cum = np.cumsum(np.maximum(starts - prev, 0.0))        # idle before each step's start
    k = int(np.searchsorted(cum, need_s))
    if k < len(cum):
        return float(starts[k] - (cum[k] - need_s))
    return float(ends[-1] + need_s - cum[-1]) if len(ends) else start_s + need_s


# --- the simulator ------------------------------------------------------------------------------------

def sim_run(wl: Workload, policy: str, profile: str = PROFILE, kv_tokens: int = DEFAULT_KV_TOKENS,
            keep_steps: bool = False, policy_options: dict | None = None) -> dict:
    steps: list[tuple[float, float]] = []
    t0 = time.time()
    res = simulate(wl, policy, profile=profile, kv_tokens=kv_tokens, policy_options=policy_options,
                   on_step=lambda plan, result, end: steps.append((end, result.duration_s)))
    out = report(res, steps, keep_steps)
    out["sim_seconds"] = round(time.time() - t0, 1)
    return out


def find_capacities(policies: list[str], hours: float, sustainable: bool) -> dict:
    from niyama.sim.capacity_study import CapacityJob, run_capacity_jobs
    from niyama.sim.scenario import Scenario

    jobs = [CapacityJob(Scenario(TRACE, p, profile=PROFILE, duration_s=hours * HOUR,
                                 workload_options={"tiers": (CHAT,)}), sustainable=sustainable) for p in policies]
    out = {}
    for res in run_capacity_jobs(jobs):
        p = res.job.scenario.policy
        out[p] = {"capacity_qps": res.capacity_qps, "sustainable_qps": res.sustainable_qps,
                  "runs": len(res.points) + len(res.long_points), "seconds": round(res.seconds, 1)}
    return out


RUNS = ("chat", "mixed", "short", "batch_alone", "chat_as_batch")


def point_run(item, tick) -> dict:
    """One (load, policy, run) of the study; the workloads are rebuilt in the worker (cheap, deterministic)."""
    qps, policy, run, seed, hours, options = item
    chat = chat_workload(qps, hours * HOUR, seed)
    specs = batch_specs(tokens_of(chat.specs), WINDOW_S, seed)
    wl = {"chat": lambda: chat,
          "mixed": lambda: with_batch(chat, specs, WINDOW_S),
          "short": lambda: with_batch(chat, specs, SHORT_WINDOW_S),
          "batch_alone": lambda: alone(specs, WINDOW_S, chat, "batch alone"),
          "chat_as_batch": lambda: alone(list(chat.specs), WINDOW_S, chat, "chat as a batch")}[run]()
    out = sim_run(wl, policy, keep_steps=run == "chat", policy_options=options)
    tick(f"{policy} {qps:g} QPS {run}")
    return out


def bounds(runs: dict, start_s: float = 0.0) -> dict:
    """The batch's yardsticks from a point's runs: chat alone (with its steps), batch alone, and if there, the
    chat's requests as one batch."""
    need = runs["batch_alone"]["busy_s"]
    ends, durations = runs["chat"]["_steps"]
    out = {"batch_gpu_s": need, "chat_idle_s": round(runs["chat"]["idle_s"], 1),
           "chat_makespan_s": runs["chat"]["makespan_s"],
           "idle_bound_s": round(idle_bound(ends, durations, need, start_s) - start_s, 1)}
    if "chat_as_batch" in runs:
        out["chat_gpu_s"] = runs["chat_as_batch"]["busy_s"]
        out["work_bound_s"] = round(out["chat_gpu_s"] + need, 1)
    return out


def ratios(b: dict, runs: dict) -> dict:
    """Each co-located run's batch completion over the bounds."""
    for key in ("mixed", "short"):
        if key in runs and "batch" in runs[key]:
            done = runs[key]["batch"]["completion_s"]
            b[f"{key}_completion_over_idle_bound"] = round(done / b["idle_bound_s"], 3)
            if "work_bound_s" in b:
                b[f"{key}_completion_over_work_bound"] = round(done / b["work_bound_s"], 3)
    return b


def simulate_study(args) -> dict:
    from niyama.sim.parallel import run_parallel

    t0 = time.time()
    if args.capacity_from:
        caps = json.loads(Path(args.capacity_from).read_text())["capacity"]
    else:
        caps = find_capacities(["niyama", "fcfs"], args.search_hours, not args.no_sustainable)
    cap = {p: c["sustainable_qps"] or c["capacity_qps"] for p, c in caps.items()}
    base = cap.get("fcfs")          # with one tier EDF's order (arrival + 6 s) is FCFS's: one capacity for both
    points = [("niyama-load", round(LOAD_FRACTION * cap["niyama"], 2), ["niyama"])]
    if base:
        points.append(("sarathi-load", round(LOAD_FRACTION * base, 2), args.baselines + ["niyama"]))
    options = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else None
    items = [(qps, pol, run, args.seed, args.chat_hours, options) for _, qps, pols in points for pol in pols
             for run in RUNS]
    results = run_parallel(point_run, items, processes=args.jobs, desc="batch co-location", show_progress=True)
    by_key = {(q, p, r): res for (q, p, r, *_), res in zip(items, results)}
    out_points = []
    for label, qps, pols in points:
        for pol in pols:
            runs = {r: by_key[(qps, pol, r)] for r in RUNS}
            b = ratios(bounds(runs), runs)
            for r in runs.values():
                r.pop("_steps", None)
            out_points.append({"point": label, "qps": qps, "policy": pol, "runs": runs, "bounds": b})
    return {"trace": TRACE, "profile": PROFILE, "arrivals": "poisson", "steps": "greedy (no sampled rows)",
            "chat_tier": CHAT.describe(), "window_s": WINDOW_S, "short_window_s": SHORT_WINDOW_S,
            "load_fraction": LOAD_FRACTION, "chat_hours": args.chat_hours, "max_num_seqs": args.max_num_seqs or 256,
            "search_hours": args.search_hours,
            "capacity": caps, "points": out_points, "seconds": round(time.time() - t0, 1)}


# --- tables ---------------------------------------------------------------------------------------------

def fmt_tier(t: dict | None) -> str:
    if not t:
        return "-"
    top = t["ttft_max_s"]
    top = f"{top:.0f}" if top >= 10 else f"{top:.1f}"
    return (f"{t['violation_pct']:.2f}% ({t['relegated']}) TTFT {t['ttft_p50_s']:.3f}/{t['ttft_p99_s']:.2f}/{top} s "
            f"TBT {t['tbt_p50_ms']:.0f}/{t['tbt_p99_ms']:.0f} ms")


CHAT_HEAD = "chat late% (relegated) TTFT p50/p99/max, TBT p50/p99"
RUN_NAMES = {"chat": "alone", "mixed": "+batch 24h", "short": "+batch 30m"}


def sim_table(res: dict) -> str:
    caps = res["capacity"]
    lines = [f"{res['trace']} on {res['profile']}, one replica; {res['arrivals']} arrivals, {res['steps']} step "
             f"times; chat tier {res['chat_tier']}; {res['chat_hours']:g} h of chat; max_num_seqs "
             f"{res.get('max_num_seqs', 256)}",
             f"chat capacity (<= 1% late; goodput search on {res['search_hours']:g}-h runs, sustainable on 2x): "
             + ", ".join(f"{p} {c['capacity_qps']:.2f} QPS (sustainable {c['sustainable_qps'] or float('nan'):.2f})"
                         for p, c in caps.items()) + "; edf's order is fcfs's with one tier",
             "",
             f"{'chat QPS':<10}{'policy':<8}{'run':<12}{CHAT_HEAD}"]
    for pt in res["points"]:
        for run in ("chat", "mixed", "short"):
            lines.append(f"{pt['qps']:<10g}{pt['policy']:<8}{RUN_NAMES[run]:<12}"
                         f"{fmt_tier(pt['runs'][run]['tiers'].get(CHAT.name))}")
    lines += ["",
              f"{'chat QPS':<10}{'policy':<8}{'lines':>7}{'Mtokens':>8}{'batch GPU s':>12}{'chat GPU s':>11}"
              f"{'chat idle s':>12}{'done 24h':>9}{'idle bound':>11}{'work bound':>11}{'/idle':>6}{'/work':>6}"
              f"{'30m: missed':>12}{'done':>7}"]
    for pt in res["points"]:
        b, mixed, short = pt["bounds"], pt["runs"]["mixed"]["batch"], pt["runs"]["short"]["batch"]
        lines.append(f"{pt['qps']:<10g}{pt['policy']:<8}{mixed['lines']:>7}{mixed['tokens'] / 1e6:>8.1f}"
                     f"{b['batch_gpu_s']:>12.0f}{b['chat_gpu_s']:>11.0f}{b['chat_idle_s']:>12.0f}"
                     f"{mixed['completion_s']:>9.0f}{b['idle_bound_s']:>11.0f}{b['work_bound_s']:>11.0f}"
                     f"{b['mixed_completion_over_idle_bound']:>6.2f}{b['mixed_completion_over_work_bound']:>6.2f}"
                     f"{short['missed']:>12}{short['completion_s']:>7.0f}")
    lines.append("times in s from the batch's submission at t=0; batch GPU s: the batch alone on an empty replica; "
                 "chat GPU s: the hour's chat requests as one batch; idle bound: when chat alone's idle time reaches "
                 "the batch GPU s; work bound: chat GPU s + batch GPU s; 30m missed: lines done after the window")
    return "\n".join(lines)


# --- the engine ----------------------------------------------------------------------------------------------

ENGINE_PARTS = ("chat", "batch", "mixed", "short")


def engine_study(args) -> dict:
    from niyama.engine import EngineConfig, LLMEngine
    from niyama.engine.sampling import SamplingMix
    from niyama.engine.trace_replay import replay

    qps = args.qps
    if qps is None:
        caps = json.loads(Path(args.capacity_from or HERE / "results" / "batch_colocation.json").read_text())
        c = caps["capacity"]["niyama"]
        qps = round(LOAD_FRACTION * (c["sustainable_qps"] or c["capacity_qps"]), 2)
    span = args.minutes * 60.0
    scale = span / HOUR
    window, short = WINDOW_S * scale, SHORT_WINDOW_S * scale
    chat = chat_workload(qps, span, args.seed)
    chat = replace(chat, specs=[replace(s, num_prompt_tokens=p, num_output_tokens=o) for s in chat.specs
                                for p, o in [clip_lengths(s, 10 ** 9, args.max_prompt_tokens, args.max_output_tokens)]])
    specs = batch_specs(tokens_of(chat.specs), window, args.seed, max_prompt_tokens=args.max_prompt_tokens,
                        max_output_tokens=args.max_output_tokens)
    workloads = {"chat": chat, "batch": alone(specs, window, chat, "batch alone"),
                 "mixed": with_batch(chat, specs, window),
                 "short": with_batch(chat, specs, short)}
    sampling = None if args.sampling == "greedy" else SamplingMix.parse(args.sampling)
    # prefix caching off: the parts repeat each other's random prompts (the same seed), which a cache left warm by
    # the previous part would serve; the simulated side has no prefixes either
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                    kv_tokens=args.kv_tokens, profile=args.profile, policy=args.policy,
                                    prefix_caching=False))
    device = engine.describe().splitlines()[0]
    print(device, flush=True)
    log: list[tuple[float, float]] = []
    engine.add_step_hook(lambda plan, result, end: log.append((end, result.duration_s)))
    kv = engine.allocator
    profile_path = Path(args.out) / f"batch_colocation_engine_{args.tag or 'run'}_profile.json"
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(json.dumps(engine.profile.to_dict()))     # what the engine plans with, uncorrected
    parts = {}
    for name in args.parts:
        wl = workloads[name]
        log.clear()
        t0 = time.time()
        out = replay(engine, wl, seed=args.seed, sampling=sampling)
        wall = time.time() - t0
        eng = report(out.result, list(log), keep_steps=name == "chat")
        eng["wall_s"] = round(wall, 1)
        eng["clipped"] = out.num_clipped
        ran = [replace(s, num_prompt_tokens=r.num_prompt_tokens, num_output_tokens=r.max_output_tokens,
                       sampled=sampling is not None) for s, r in zip(wl.specs, out.result.requests)]
        sim = sim_run(replace(wl, specs=ran), args.policy, profile=str(profile_path),
                      kv_tokens=kv.num_blocks * kv.block_size, keep_steps=name == "chat")
        if name == "chat":        # the work bound's chat GPU time, simulated only (device time is dear)
            sim["chat_as_batch_gpu_s"] = sim_run(alone(ran, window, wl, "chat as a batch"), args.policy,
                                                 profile=str(profile_path),
                                                 kv_tokens=kv.num_blocks * kv.block_size)["busy_s"]
        parts[name] = {"engine": eng, "simulator": sim}
        print(f"{name}: {len(wl)} requests, {wall:.0f} s; engine {fmt_tier(eng['tiers'].get(CHAT.name))}"
              + (f"; batch done {eng['batch']['completion_s']:.1f} s, missed {eng['batch']['missed']}"
                 if "batch" in eng else ""), flush=True)
    return {"device": device, "policy": args.policy, "qps": qps, "minutes": args.minutes, "window_s": window,
            "short_window_s": short, "arrivals": "poisson", "sampling": args.sampling,
            "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
            "chat_requests": len(chat), "batch_lines": len(specs), "batch_tokens": tokens_of(specs),
            "kv_tokens": kv.num_blocks * kv.block_size, "parts": parts}


def merge_engine(path: Path, res: dict) -> dict:
    """Parts run in separate commands (one H100 command is limited to 10 minutes) land in one file, if the
    workload is the same. The idle bound needs the chat part's steps, so it is computed where chat and batch
    run in one command, and kept."""
    old_bounds = {}
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(k) == res[k] for k in ("qps", "minutes", "policy", "max_prompt_tokens", "max_output_tokens",
                                                "sampling", "batch_tokens")):
            res["parts"] = {**old["parts"], **res["parts"]}
            old_bounds = old.get("bounds", {})
    p = res["parts"]
    res["bounds"] = {}
    for side in ("engine", "simulator"):
        if "chat" in p and "batch" in p and "_steps" in p["chat"][side]:
            runs = {"chat": p["chat"][side], "batch_alone": p["batch"][side]}
            if "chat_as_batch_gpu_s" in p["chat"][side]:
                runs["chat_as_batch"] = {"busy_s": p["chat"][side]["chat_as_batch_gpu_s"]}
            b = bounds(runs)
        elif side in old_bounds:
            b = old_bounds[side]
        else:
            continue
        res["bounds"][side] = ratios(b, {k: p[k][side] for k in ("mixed", "short") if k in p})
    return res


def engine_table(res: dict) -> str:
    lines = [f"{res['device']}; {res['policy']}; chat {res['qps']:g} QPS for {res['minutes']:g} min "
             f"({res['chat_requests']} requests, {res['arrivals']} arrivals, {res['sampling']}), batch "
             f"{res['batch_lines']} lines / {res['batch_tokens']} tokens at t=0, windows {res['window_s']:.0f} s "
             f"and {res['short_window_s']:.0f} s",
             f"{'part':<7}{'side':<11}{CHAT_HEAD:<64}{'busy s':>8}"
             f"{'makespan':>10}{'missed':>8}{'done (s)':>10}"]
    for name in ENGINE_PARTS:
        if name not in res["parts"]:
            continue
        for side in ("engine", "simulator"):
            r = res["parts"][name][side]
            bt = r.get("batch")
            lines.append(f"{name:<7}{side:<11}{fmt_tier(r['tiers'].get(CHAT.name)):<64}{r['busy_s']:>8.1f}"
                         f"{r['makespan_s']:>10.1f}" + (f"{bt['missed']:>8}{bt['completion_s']:>10.1f}" if bt else ""))
    for side, b in res.get("bounds", {}).items():
        lines.append(f"{side}: batch alone {b['batch_gpu_s']:.1f} GPU s; chat alone idle {b['chat_idle_s']:.1f} s of "
                     f"{b['chat_makespan_s']:.1f}; idle bound {b['idle_bound_s']:.1f} s"
                     + (f"; work bound {b['work_bound_s']:.1f} s" if "work_bound_s" in b else "")
                     + "".join(f"; {k} completion / {w} bound {b[f'{k}_completion_over_{w}_bound']:.2f}"
                               for k in ("mixed", "short") for w in ("idle", "work")
                               if f"{k}_completion_over_{w}_bound" in b))
    return "\n".join(lines)


def strip_steps(res: dict) -> dict:
    for part in res.get("parts", {}).values():
        for side in part.values():
            side.pop("_steps", None)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--capacity-from", default=None, metavar="JSON",
                   help="take the chat capacities from an earlier run's JSON instead of searching")
    p.add_argument("--search-hours", type=float, default=1.0, help="length of the capacity search's runs (1)")
    p.add_argument("--chat-hours", type=float, default=1.0, help="hours of chat arrivals; the batch holds as many "
                   "tokens (1)")
    p.add_argument("--no-sustainable", action="store_true", help="skip the 2x-length sustainable check")
    p.add_argument("--baselines", default="fcfs,edf", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the policies' max_num_seqs (default 256); the "
                   "capacities stay those searched with 256")
    p.add_argument("--tag", default=None, help="results go to batch_colocation[_engine]_<tag>.*")
    g = p.add_argument_group("engine mode")
    g.add_argument("--engine", action="store_true", help="replay the scaled workload on the model engine")
    g.add_argument("--parts", default=",".join(ENGINE_PARTS), type=lambda s: [x for x in s.split(",") if x])
    g.add_argument("--minutes", type=float, default=3.0, help="minutes of chat arrivals (3)")
    g.add_argument("--qps", type=float, default=None,
                   help="chat QPS (default: 80%% of the simulated niyama capacity in the simulator's JSON)")
    g.add_argument("--policy", default="niyama")
    g.add_argument("--model", default=None)
    g.add_argument("--load-format", default="auto")
    g.add_argument("--device", default=None)
    g.add_argument("--kv-tokens", type=int, default=None)
    g.add_argument("--profile", default="auto", help="the engine's batch-time profile (default auto)")
    g.add_argument("--sampling", default="greedy", help="greedy, or a `niyama replay --sampling` mix (chat, ...)")
    g.add_argument("--max-prompt-tokens", type=int, default=None)
    g.add_argument("--max-output-tokens", type=int, default=None)
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.engine:
        unknown = set(args.parts) - set(ENGINE_PARTS)
        if unknown:
            p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(ENGINE_PARTS)}")
        path = out_dir / f"batch_colocation_engine_{args.tag or 'run'}.json"
        res = strip_steps(merge_engine(path, engine_study(args)))
        text = engine_table(res)
        path.write_text(json.dumps(res, indent=1))
        path.with_suffix(".txt").write_text(text + "\n")
    else:
        res = simulate_study(args)
        text = sim_table(res)
        path = out_dir / (f"batch_colocation_{args.tag}.json" if args.tag else "batch_colocation.json")
        path.write_text(json.dumps(res, indent=1))
        path.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"wrote {path} and {path.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
